//! The reseller REST API on the real test bed (kube-apiserver, MySQL, Redis, ClickHouse): the
//! role matrix swept from its one table, sales scoping, the CRs as the truth next to kubectl and
//! GitOps, and money.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    clippy::too_many_arguments,
    clippy::many_single_char_names,
    clippy::cast_precision_loss
)]

mod idp;

use std::collections::BTreeMap;

use aigw_apiserver::{
    api::matrix::{self, Access, ENDPOINTS, Op},
    sso::{jwt::Grant, roles::Role},
};
use aigw_crds::{TenantType, labels};
use idp::{Idp, T};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api,
    api::{PostParams, ResourceExt},
};
use serde_json::{Value, json};

/// A signed-in member of a test tenant.
#[derive(Debug, Clone)]
struct Member {
    role: Role,
    id: i64,
    token: String,
}

/// An access token for `user_id` with `roles`, minted by the provider's own signer for the site
/// the client reaches (`<domain>:<port>`), exactly as the token endpoint mints it.
fn mint(idp: &Idp, t: &T, user_id: i64, roles: &[Role]) -> String {
    let site = idp
        .sso
        .site(&format!("{}:{}", t.domain, idp.addr.port()))
        .expect("site");
    let grant = Grant {
        user_id,
        client_id: "api-test".into(),
        scope: "openid".into(),
        sid: aigw_apiserver::sso::random_id(),
        family: aigw_apiserver::sso::random_id(),
        roles: roles.to_vec(),
    };
    idp.sso.mint_access(&site, &grant).unwrap().0
}

async fn call(
    http: &reqwest::Client,
    idp: &Idp,
    host: &T,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> (u16, Value, reqwest::header::HeaderMap) {
    let url = format!("https://{}:{}{path}", host.domain, idp.addr.port());
    let mut rb = http
        .request(method.parse().unwrap(), url)
        .bearer_auth(token);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    if let Some(b) = body {
        rb = rb.json(b);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let text = resp.text().await.unwrap();
    if status >= 400 {
        assert_eq!(
            h.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{method} {path} → {status} {text}"
        );
    }
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        h,
    )
}

async fn ensure_namespace(idp: &Idp, t: &T) {
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": format!("aigw-{}", t.name)}})).unwrap();
    match Api::<Namespace>::all(idp.client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("{e}"),
    }
}

/// A Token CR made as kubectl would (with this test's instance label), owned by `owner`.
async fn kubectl_token(idp: &Idp, t: &T, name: &str, owner: &str, extra: Value) {
    let mut meta = json!({"name": name, "labels": {labels::INSTANCE: idp.instance}});
    if let Some(m) = extra.get("labels") {
        for (k, v) in m.as_object().unwrap() {
            meta["labels"][k] = v.clone();
        }
    }
    let token: aigw_crds::Token = serde_json::from_value(json!({
        "apiVersion": "aigateway.io/v1alpha1", "kind": "Token", "metadata": meta,
        "spec": {"owner": owner}}))
    .unwrap();
    Api::<aigw_crds::Token>::namespaced(idp.client.clone(), &format!("aigw-{}", t.name))
        .create(&PostParams::default(), &token)
        .await
        .unwrap();
}

async fn kubectl_channel(idp: &Idp, name: &str) {
    let c: aigw_crds::Channel = serde_json::from_value(json!({
        "apiVersion": "aigateway.io/v1alpha1", "kind": "Channel",
        "metadata": {"name": name, "labels": {labels::INSTANCE: idp.instance}},
        "spec": {"provider": "openai", "models": ["gpt-4o"],
                 "credentials": {"name": "x", "namespace": idp.credentials_namespace, "key": "k"}}}))
    .unwrap();
    Api::<aigw_crds::Channel>::all(idp.client.clone())
        .create(&PostParams::default(), &c)
        .await
        .unwrap();
}

async fn delete_channels(idp: &Idp) {
    let api = Api::<aigw_crds::Channel>::all(idp.client.clone());
    let _ = api
        .delete_collection(
            &kube::api::DeleteParams::default(),
            &kube::api::ListParams::default().labels(&format!(
                "{}={}",
                labels::INSTANCE,
                idp.instance
            )),
        )
        .await;
}

async fn pricing(idp: &Idp, t: &T) {
    let p: aigw_crds::Pricing = serde_json::from_value(json!({
        "apiVersion": "aigateway.io/v1alpha1", "kind": "Pricing",
        "metadata": {"name": "pricing", "labels": {labels::INSTANCE: idp.instance}},
        "spec": {"currency": "USD", "models": [{"model": "gpt-4o", "input": "2.5", "output": "10"}]}}))
    .unwrap();
    Api::<aigw_crds::Pricing>::namespaced(idp.client.clone(), &format!("aigw-{}", t.name))
        .create(&PostParams::default(), &p)
        .await
        .unwrap();
}

async fn bind(idp: &Idp, t: &T, customer: i64, sales: i64) {
    sqlx::query(
        "INSERT INTO customer_bindings (tenant_id, customer_id, sales_id) VALUES (?, ?, ?)",
    )
    .bind(t.id)
    .bind(customer)
    .bind(sales)
    .execute(&idp.db)
    .await
    .unwrap();
}

/// One tenant of the sweep: a member per role its type may grant (`<role>1`), the customer
/// `user1` bound to `sales1`, a spare member the role endpoints act on, a key of `user1` and a
/// price list.
struct Fixture {
    t: T,
    kind: TenantType,
    members: Vec<Member>,
    customer: i64,
    spare: i64,
    key: String,
}

async fn fixture(idp: &Idp, prefix: &str, kind: TenantType) -> Fixture {
    let t = idp
        .tenant(
            prefix,
            match kind {
                TenantType::Platform => "platform",
                TenantType::Reseller => "reseller",
            },
            prefix,
            Value::Null,
        )
        .await;
    ensure_namespace(idp, &t).await;
    let mut members = Vec::new();
    for role in Role::ALL.into_iter().filter(|r| r.available_to(kind)) {
        let username = format!("{role}1");
        let id = idp
            .user(&t, &username, "pw-unused-here", &[role.as_str()])
            .await;
        members.push(Member {
            role,
            id,
            token: mint(idp, &t, id, &[role]),
        });
    }
    let by = |r: Role| members.iter().find(|m| m.role == r).unwrap().id;
    let customer = by(Role::User);
    bind(idp, &t, customer, by(Role::Sales)).await;
    let spare = idp.user(&t, "spare", "pw-unused-here", &["finance"]).await;
    let key = format!("fix-{}", t.name);
    kubectl_token(idp, &t, &key, "user1", json!({})).await;
    pricing(idp, &t).await;
    Fixture {
        t,
        kind,
        members,
        customer,
        spare,
        key,
    }
}

/// The status an allowed call of `method path` answers in the sweep.
fn success(kind: TenantType, method: &str, path: &str) -> u16 {
    match (method, path) {
        // A reseller has no resellers of its own to bind.
        ("PUT", "/api/v1/resellers/{name}/sales") if kind == TenantType::Reseller => 404,
        ("POST", "/api/v1/withdrawals") => 422, // allowed, but there is no balance to withdraw
        ("POST", _) => 201,
        ("DELETE", _) => 204,
        _ => 200,
    }
}

/// The concrete request of an endpoint for `m`'s tenant `f`; `n` makes names unique.
async fn request(
    idp: &Idp,
    f: &Fixture,
    other: &Fixture,
    path: &str,
    method: &str,
    n: usize,
) -> (String, Option<Value>) {
    let p = path.replace(
        "{id}",
        &if path.starts_with("/api/v1/customers") {
            f.customer
        } else {
            f.spare
        }
        .to_string(),
    );
    match (method, path) {
        ("DELETE", "/api/v1/keys/{name}") => {
            let name = format!("del-{n}");
            kubectl_token(idp, &f.t, &name, "user1", json!({})).await;
            (p.replace("{name}", &name), None)
        }
        ("DELETE", "/api/v1/channels/{name}") => {
            let name = format!("{}-del-{n}", idp.instance);
            kubectl_channel(idp, &name).await;
            (p.replace("{name}", &name), None)
        }
        (_, "/api/v1/channels/{name}") => (
            p.replace("{name}", &format!("{}-fix", idp.instance)),
            Some(json!({"weight": 50})),
        ),
        (_, "/api/v1/keys/{name}") => (
            p.replace("{name}", &f.key),
            Some(json!({"displayName": "renamed"})),
        ),
        ("POST", "/api/v1/keys") => (p, Some(json!({"displayName": "sweep"}))),
        ("POST", "/api/v1/channels") => (
            p,
            Some(
                json!({"name": format!("{}-new-{n}", idp.instance), "provider": "openai", "models": ["gpt-4o"], "apiKey": "sk-upstream"}),
            ),
        ),
        ("PATCH", "/api/v1/tenant") => (p, Some(json!({}))),
        (_, "/api/v1/resellers/{name}/sales") => {
            let sales = f.members.iter().find(|m| m.role == Role::Sales).unwrap().id;
            // On the platform, the other (reseller) tenant; a reseller has no resellers at all.
            let name = if f.kind == TenantType::Platform {
                other.t.name.clone()
            } else {
                "no-such-reseller".to_owned()
            };
            (p.replace("{name}", &name), Some(json!({"salesId": sales})))
        }
        ("PATCH", _) => (p, Some(json!({"active": true}))),
        ("PUT", "/api/v1/members/{id}/roles") => (p, Some(json!({"roles": ["finance"]}))),
        ("PUT", "/api/v1/pricing") => (
            p,
            Some(
                json!({"currency": "USD", "models": [{"model": "gpt-4o", "input": "2.5", "output": "10"}]}),
            ),
        ),
        ("GET", "/api/v1/settlements/statement") => {
            (format!("{p}?from=2026-01-01&to=2026-02-01"), None)
        }
        ("POST", "/api/v1/settlements") => {
            (p, Some(json!({"from": "2026-01-01", "to": "2026-02-01"})))
        }
        ("POST", "/api/v1/withdrawals") => (p, Some(json!({"amount": "1.00"}))),
        _ => (p, None),
    }
}

/// Every endpoint × every role × {own tenant, another tenant's objects, another tenant's domain,
/// the platform}: the answer is the one `matrix::MATRIX` gives, and no answer to one reseller's
/// member names anything of the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_role_matrix_holds_for_every_endpoint_role_and_tenant() {
    let idp = Idp::start(|_| {}).await;
    let a = fixture(&idp, "sweep-a", TenantType::Reseller).await;
    let b = fixture(&idp, "sweep-b", TenantType::Reseller).await;
    let p = fixture(&idp, "sweep-p", TenantType::Platform).await;
    kubectl_channel(&idp, &format!("{}-fix", idp.instance)).await;
    let platform_sales = p.members.iter().find(|m| m.role == Role::Sales).unwrap().id;
    sqlx::query("INSERT INTO reseller_bindings (reseller_id, sales_id) VALUES (?, ?)")
        .bind(a.t.id)
        .bind(platform_sales)
        .execute(&idp.db)
        .await
        .unwrap();
    let http = idp.http(&[&a.t, &b.t, &p.t]);
    // Wait until the token cache has the fixtures (lists read it).
    let owner_a = a.members.iter().find(|m| m.role == Role::Owner).unwrap();
    for _ in 0..100 {
        let (_, v, _) = call(
            &http,
            &idp,
            &a.t,
            &owner_a.token,
            "GET",
            "/api/v1/keys",
            None,
            &[],
        )
        .await;
        if v["items"].as_array().is_some_and(|i| !i.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let mut n = 0;
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for (f, other) in [(&a, &b), (&b, &a), (&p, &a)] {
        for m in &f.members {
            for e in ENDPOINTS {
                n += 1;
                let access = e.function.map_or(Access::Own, |func| {
                    matrix::access(f.kind, &[m.role], func, e.op)
                });
                let expected = if access == Access::No {
                    403
                } else {
                    success(f.kind, e.method, e.path)
                };
                let (path, body) = request(&idp, f, other, e.path, e.method, n).await;
                let (status, value, _) = call(
                    &http,
                    &idp,
                    &f.t,
                    &m.token,
                    e.method,
                    &path,
                    body.as_ref(),
                    &[],
                )
                .await;
                checked += 1;
                if status != expected {
                    mismatches.push(format!(
                        "{} {} {} {path}: {status}, matrix says {expected} ({value})",
                        f.t.name, m.role, e.method
                    ));
                }
                // No answer to a reseller's member names the other reseller.
                if f.kind == TenantType::Reseller {
                    let text = value.to_string();
                    assert!(
                        !text.contains(&other.t.name) && !text.contains(&other.key),
                        "{} {} {path} leaked the other tenant: {text}",
                        m.role,
                        e.method
                    );
                }
                // Another tenant's object, addressed from this tenant's domain, is missing.
                let cross = match e.path {
                    "/api/v1/keys/{name}" if e.method != "DELETE" => {
                        Some(format!("/api/v1/keys/{}", other.key))
                    }
                    "/api/v1/members/{id}" => Some(format!("/api/v1/members/{}", other.spare)),
                    "/api/v1/members/{id}/roles" => {
                        Some(format!("/api/v1/members/{}/roles", other.spare))
                    }
                    "/api/v1/customers/{id}" => {
                        Some(format!("/api/v1/customers/{}", other.customer))
                    }
                    _ => None,
                };
                if let Some(cross) = cross {
                    let (_, body) = request(&idp, f, other, e.path, e.method, n).await;
                    let (status, value, _) = call(
                        &http,
                        &idp,
                        &f.t,
                        &m.token,
                        e.method,
                        &cross,
                        body.as_ref(),
                        &[],
                    )
                    .await;
                    checked += 1;
                    let want = if access == Access::No { 403 } else { 404 };
                    if status != want {
                        mismatches.push(format!(
                            "{} {} {} {cross} (other tenant's): {status}, want {want} ({value})",
                            f.t.name, m.role, e.method
                        ));
                    }
                }
                // Naming another tenant in a query: platform staff with `All` only.
                if matches!(e.path, "/api/v1/usage" | "/api/v1/settlements") && access != Access::No
                {
                    let q = format!("{}?tenant={}", e.path, other.t.name);
                    let (status, value, _) =
                        call(&http, &idp, &f.t, &m.token, "GET", &q, None, &[]).await;
                    checked += 1;
                    // Platform staff read any tenant; a platform sales person their bound
                    // resellers (reseller A is bound to the platform's sales1).
                    let bound = e.path == "/api/v1/usage" && m.role == Role::Sales;
                    let want = if f.kind == TenantType::Platform && (access == Access::All || bound)
                    {
                        200
                    } else {
                        403
                    };
                    if status != want {
                        mismatches.push(format!(
                            "{} {} GET {q}: {status}, want {want} ({value})",
                            f.t.name, m.role
                        ));
                    }
                }
            }
            // The member's token on the other tenant's domain is no token at all there.
            let (status, _, _) = call(
                &http,
                &idp,
                &other.t,
                &m.token,
                "GET",
                "/api/v1/me",
                None,
                &[],
            )
            .await;
            checked += 1;
            if status != 401 {
                mismatches.push(format!(
                    "{} {} token on {}: {status}, want 401",
                    f.t.name, m.role, other.t.name
                ));
            }
        }
    }
    eprintln!("matrix sweep: {checked} calls");
    assert!(checked > 400, "the sweep ran {checked} calls");
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );

    delete_channels(&idp).await;
    sqlx::query("DELETE FROM reseller_bindings WHERE reseller_id IN (?, ?)")
        .bind(a.t.id)
        .bind(b.t.id)
        .execute(&idp.db)
        .await
        .unwrap();
    idp.cleanup().await;
}

/// The platform's sales people have whole resellers as customers (the seed's Alice): each sees
/// and reads the usage of exactly the resellers bound to them; a reseller bound to one cannot be
/// taken by another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_sales_have_resellers_as_customers() {
    let idp = Idp::start(|_| {}).await;
    let p = idp
        .tenant("psales", "platform", "Platform", Value::Null)
        .await;
    let r1 = idp.tenant("r1", "reseller", "R1", Value::Null).await;
    let r2 = idp.tenant("r2", "reseller", "R2", Value::Null).await;
    let r3 = idp.tenant("r3", "reseller", "R3", Value::Null).await;
    let owner = idp.user(&p, "root", "x", &["owner"]).await;
    let alice = idp.user(&p, "alice", "x", &["sales"]).await;
    let bob = idp.user(&p, "bob", "x", &["sales"]).await;
    let fin = idp.user(&p, "fin", "x", &["finance"]).await;
    let r1_sales = idp.user(&r1, "rs", "x", &["sales"]).await;
    let http = idp.http(&[&p, &r1]);
    let (towner, talice, tbob, tfin) = (
        mint(&idp, &p, owner, &[Role::Owner]),
        mint(&idp, &p, alice, &[Role::Sales]),
        mint(&idp, &p, bob, &[Role::Sales]),
        mint(&idp, &p, fin, &[Role::Finance]),
    );
    let put = |token: String, r: &T, sales: i64| {
        let (http, idp, p, path) = (
            http.clone(),
            &idp,
            &p,
            format!("/api/v1/resellers/{}/sales", r.name),
        );
        async move {
            call(
                &http,
                idp,
                p,
                &token,
                "PUT",
                &path,
                Some(&json!({"salesId": sales})),
                &[],
            )
            .await
        }
    };
    // The owner binds r1 to alice; bob takes the unbound r2; alice cannot take bob's r2, and
    // bob cannot bind anything to alice.
    assert_eq!(put(towner.clone(), &r1, alice).await.0, 200);
    assert_eq!(put(towner.clone(), &r2, bob).await.0, 200);
    assert_eq!(
        put(tbob.clone(), &r2, bob).await.0,
        200,
        "bob confirms his own"
    );
    assert_eq!(
        put(talice.clone(), &r2, alice).await.0,
        404,
        "bob's reseller is not alice's to see"
    );
    assert_eq!(
        put(talice.clone(), &r3, alice).await.0,
        404,
        "nor an unbound one to take"
    );
    assert_eq!(put(tbob.clone(), &r3, alice).await.0, 403);
    assert_eq!(
        put(tfin.clone(), &r3, fin).await.0,
        403,
        "finance reads customers only"
    );
    assert_eq!(
        put(towner.clone(), &r3, fin).await.0,
        422,
        "finance is no sales person"
    );
    let names = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, v, _) = call(
        &http,
        &idp,
        &p,
        &talice,
        "GET",
        "/api/v1/resellers",
        None,
        &[],
    )
    .await;
    assert_eq!(names(&v), vec![r1.name.clone()]);
    let (_, v, _) = call(
        &http,
        &idp,
        &p,
        &tfin,
        "GET",
        "/api/v1/resellers",
        None,
        &[],
    )
    .await;
    let mut all = vec![r1.name.clone(), r2.name.clone(), r3.name.clone()];
    all.sort();
    assert_eq!(names(&v), all);
    assert_eq!(
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["salesId"] == bob)
            .count(),
        1
    );
    // A reseller's own sales person has no resellers.
    let trs = mint(&idp, &r1, r1_sales, &[Role::Sales]);
    let (s, v, _) = call(
        &http,
        &idp,
        &r1,
        &trs,
        "GET",
        "/api/v1/resellers",
        None,
        &[],
    )
    .await;
    assert_eq!((s, names(&v).len()), (200, 0));

    // Usage: alice reads r1's, as the platform sees it (what r1 owes), and nothing else.
    let now = chrono::Utc::now().timestamp();
    for (i, t) in [&r1, &r2, &r3].iter().enumerate() {
        idp.clickhouse
            .query(&format!(
                "INSERT INTO usage_logs (event_id, trace_id, tenant_id, user_id, token_id, channel_id, model, \
                 prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens, cost, platform_cost, \
                 upstream_cost, latency_ms, status, created_at, currency) VALUES \
                 ('p{i}', 't', {}, 1, 1, 1, 'gpt-4o', 10, 1, 0, 0, 11, {}, 1, 0.5, 5, 'success', {now}, 'USD')",
                t.id,
                i + 2
            ))
            .execute()
            .await
            .unwrap();
    }
    let (s, v, _) = call(
        &http,
        &idp,
        &p,
        &talice,
        "GET",
        "/api/v1/usage?tenant=*&groupBy=tenant",
        None,
        &[],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{v}");
    assert_eq!(items[0]["key"], r1.id.to_string());
    assert_eq!(items[0]["platformCost"], "1.000000");
    assert!(items[0].get("upstreamCost").is_none(), "{v}");
    let (s, _, _) = call(
        &http,
        &idp,
        &p,
        &talice,
        "GET",
        &format!("/api/v1/usage?tenant={}", r2.name),
        None,
        &[],
    )
    .await;
    assert_eq!(s, 403, "another sales person's reseller");
    let (s, v, _) = call(
        &http,
        &idp,
        &p,
        &towner,
        "GET",
        "/api/v1/usage?tenant=*&groupBy=tenant",
        None,
        &[],
    )
    .await;
    assert_eq!((s, v["items"].as_array().unwrap().len()), (200, 3), "{v}");

    sqlx::query("DELETE FROM reseller_bindings WHERE reseller_id IN (?, ?, ?)")
        .bind(r1.id)
        .bind(r2.id)
        .bind(r3.id)
        .execute(&idp.db)
        .await
        .unwrap();
    idp.cleanup().await;
}

/// Two sales people see exactly their bound customers: in the customer list, the keys and the
/// usage; finance sees all of them read-only; a customer sees only themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_see_only_their_bound_customers() {
    let idp = Idp::start(|_| {}).await;
    let t = idp
        .tenant("sales", "reseller", "Sales Co", Value::Null)
        .await;
    ensure_namespace(&idp, &t).await;
    let s1 = idp.user(&t, "s1", "x", &["sales"]).await;
    let s2 = idp.user(&t, "s2", "x", &["sales"]).await;
    let fin = idp.user(&t, "fin", "x", &["finance"]).await;
    let c1 = idp.user(&t, "c1", "x", &["user"]).await;
    let c2 = idp.user(&t, "c2", "x", &["user"]).await;
    let c3 = idp.user(&t, "c3", "x", &["user"]).await;
    bind(&idp, &t, c1, s1).await;
    bind(&idp, &t, c3, s1).await;
    bind(&idp, &t, c2, s2).await;
    for (name, owner) in [
        ("k-c1", "c1"),
        ("k-c2", "c2"),
        ("k-c3", "c3"),
        ("k-s2", "s2"),
    ] {
        kubectl_token(&idp, &t, name, owner, json!({})).await;
    }
    // Usage of each customer, and of another tenant with the same user ids.
    let now = chrono::Utc::now().timestamp();
    for (i, (tenant, user, cost)) in [
        (t.id, c1, 1_000_000),
        (t.id, c2, 2_000_000),
        (t.id, c3, 4_000_000),
        (t.id + 1, c1, 8_000_000),
    ]
    .iter()
    .enumerate()
    {
        idp.clickhouse
            .query(&format!(
                "INSERT INTO usage_logs (event_id, trace_id, tenant_id, user_id, token_id, channel_id, model, \
                 prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens, cost, platform_cost, \
                 upstream_cost, latency_ms, status, created_at, currency) VALUES \
                 ('e{i}', 't', {tenant}, {user}, 1, 1, 'gpt-4o', 10, 1, 0, 0, 11, {c}, {h}, {q}, 5, 'success', {now}, 'USD')",
                // Exact decimals from whole millionths, as the worker writes them.
                c = rust_decimal::Decimal::new(i64::from(*cost), 6),
                h = rust_decimal::Decimal::new(i64::from(*cost) / 2, 6),
                q = rust_decimal::Decimal::new(i64::from(*cost) / 4, 6),
            ))
            .execute()
            .await
            .unwrap();
    }
    let http = idp.http(&[&t]);
    let tok = |id: i64, r: Role| mint(&idp, &t, id, &[r]);
    let (ts1, ts2, tfin, tc1) = (
        tok(s1, Role::Sales),
        tok(s2, Role::Sales),
        tok(fin, Role::Finance),
        tok(c1, Role::User),
    );
    let names = |v: &Value, field: &str| -> Vec<String> {
        let mut n: Vec<String> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i[field].as_str().unwrap_or_default().to_owned())
            .collect();
        n.sort();
        n
    };
    let get = |token: String, path: &'static str| {
        let http = http.clone();
        let idp = &idp;
        let t = &t;
        async move {
            let (s, v, _) = call(&http, idp, t, &token, "GET", path, None, &[]).await;
            assert_eq!(s, 200, "{path}: {v}");
            v
        }
    };
    assert_eq!(
        names(&get(ts1.clone(), "/api/v1/customers").await, "username"),
        ["c1", "c3"]
    );
    assert_eq!(
        names(&get(ts2.clone(), "/api/v1/customers").await, "username"),
        ["c2"]
    );
    assert_eq!(
        names(&get(tfin.clone(), "/api/v1/customers").await, "username"),
        ["c1", "c2", "c3"]
    );
    // Keys: the cache may lag the kubectl writes by a moment.
    let mut keys1 = Vec::new();
    for _ in 0..100 {
        keys1 = names(&get(ts1.clone(), "/api/v1/keys").await, "name");
        if keys1.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(keys1, ["k-c1", "k-c3"]);
    assert_eq!(
        names(&get(ts2.clone(), "/api/v1/keys").await, "name"),
        ["k-c2", "k-s2"]
    );
    assert_eq!(
        names(&get(tc1.clone(), "/api/v1/keys").await, "name"),
        ["k-c1"]
    );
    // A sales person cannot reach another's customer: not their key, not their account.
    let (s, _, _) = call(&http, &idp, &t, &ts1, "GET", "/api/v1/keys/k-c2", None, &[]).await;
    assert_eq!(s, 404);
    let (s, _, _) = call(
        &http,
        &idp,
        &t,
        &ts1,
        "PATCH",
        &format!("/api/v1/customers/{c2}"),
        Some(&json!({"active": false})),
        &[],
    )
    .await;
    assert_eq!(s, 404);
    let (s, _, _) = call(
        &http,
        &idp,
        &t,
        &ts1,
        "POST",
        "/api/v1/keys",
        Some(&json!({"owner": "c2"})),
        &[],
    )
    .await;
    assert_eq!(s, 403, "a key for another sales person's customer");
    let (s, created, _) = call(
        &http,
        &idp,
        &t,
        &ts1,
        "POST",
        "/api/v1/keys",
        Some(&json!({"owner": "c1", "quota": 1000})),
        &[],
    )
    .await;
    assert_eq!(s, 201, "{created}");
    // A customer cannot lift their own limits.
    let (s, _, _) = call(
        &http,
        &idp,
        &t,
        &tc1,
        "PATCH",
        "/api/v1/keys/k-c1",
        Some(&json!({"quota": -1})),
        &[],
    )
    .await;
    assert_eq!(s, 403);
    // Usage by user: exactly the bound customers' rows, and never the other tenant's.
    let by_user = |v: &Value| -> BTreeMap<String, String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["key"].as_str().unwrap().to_owned(),
                    l["cost"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let u1 = by_user(&get(ts1.clone(), "/api/v1/usage?groupBy=user").await);
    assert_eq!(
        u1,
        BTreeMap::from([
            (c1.to_string(), "1.000000".to_owned()),
            (c3.to_string(), "4.000000".to_owned())
        ])
    );
    let u2 = by_user(&get(ts2.clone(), "/api/v1/usage?groupBy=user").await);
    assert_eq!(
        u2,
        BTreeMap::from([(c2.to_string(), "2.000000".to_owned())])
    );
    let uc = get(tc1.clone(), "/api/v1/usage?groupBy=user").await;
    assert_eq!(
        by_user(&uc),
        BTreeMap::from([(c1.to_string(), "1.000000".to_owned())])
    );
    assert!(
        uc["items"][0].get("platformCost").is_none(),
        "a customer sees no platform cost"
    );
    let uf = get(tfin.clone(), "/api/v1/usage?groupBy=user").await;
    assert_eq!(by_user(&uf).len(), 3);
    assert!(
        uf["items"][0].get("platformCost").is_some()
            && uf["items"][0].get("upstreamCost").is_none(),
        "a reseller's finance sees what it owes, never the platform's upstream cost: {uf}"
    );
    // A bound customer made staff leaves the sales person's reach.
    sqlx::query("INSERT INTO user_roles (user_id, tenant_id, role) VALUES (?, ?, 'finance')")
        .bind(c3)
        .bind(t.id)
        .execute(&idp.db)
        .await
        .unwrap();
    let (s, _, _) = call(&http, &idp, &t, &ts1, "GET", "/api/v1/keys/k-c3", None, &[]).await;
    assert_eq!(s, 404, "a promoted customer's key");
    // A customer may bring their key's expiry forward, never remove or extend it.
    let k = "/api/v1/keys/k-c1";
    let tok_s = tok(s1, Role::Sales);
    let (s, v, _) = call(
        &http,
        &idp,
        &t,
        &tok_s,
        "PATCH",
        k,
        Some(&json!({"expiresAt": "2030-01-01T00:00:00Z"})),
        &[],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    for later in [json!(null), json!("2031-01-01T00:00:00Z")] {
        let (s, v, _) = call(
            &http,
            &idp,
            &t,
            &tc1,
            "PATCH",
            k,
            Some(&json!({"expiresAt": later})),
            &[],
        )
        .await;
        assert_eq!(s, 403, "{v}");
    }
    let (s, v, _) = call(
        &http,
        &idp,
        &t,
        &tc1,
        "PATCH",
        k,
        Some(&json!({"expiresAt": "2029-01-01T00:00:00Z"})),
        &[],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    // Finance reads customers but manages none.
    let (s, _, _) = call(
        &http,
        &idp,
        &t,
        &tfin,
        "PATCH",
        &format!("/api/v1/customers/{c1}"),
        Some(&json!({"active": false})),
        &[],
    )
    .await;
    assert_eq!(s, 403);

    let _ = created;
    idp.cleanup().await;
}

/// The CRs are the truth: a kubectl-made key shows in the API, an API-made one in kubectl (with
/// only its hash), a GitOps-managed one is read-only with a 409, `If-Match` guards updates, and
/// lists page with a cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_token_crs_shared_with_kubectl_and_gitops() {
    let idp = Idp::start(|_| {}).await;
    let t = idp
        .tenant("gitops", "reseller", "GitOps Co", Value::Null)
        .await;
    ensure_namespace(&idp, &t).await;
    let owner = idp.user(&t, "boss", "x", &["owner"]).await;
    let token = mint(&idp, &t, owner, &[Role::Owner]);
    let http = idp.http(&[&t]);
    let tokens =
        Api::<aigw_crds::Token>::namespaced(idp.client.clone(), &format!("aigw-{}", t.name));

    kubectl_token(&idp, &t, "from-kubectl", "boss", json!({})).await;
    kubectl_token(
        &idp,
        &t,
        "from-argo",
        "boss",
        json!({"labels": {"app.kubernetes.io/instance": "tenant-gitops"}}),
    )
    .await;
    let mut seen = Value::Null;
    for _ in 0..100 {
        (_, seen, _) = call(&http, &idp, &t, &token, "GET", "/api/v1/keys", None, &[]).await;
        if seen["items"].as_array().is_some_and(|i| i.len() == 2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let items = seen["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{seen}");
    assert_eq!(items[0]["name"], "from-argo");
    assert_eq!(items[0]["gitops"], true);
    assert_eq!(items[1]["gitops"], false);

    // GitOps-managed: every write is a 409 that says why.
    for (method, body) in [("PATCH", Some(json!({"disabled": true}))), ("DELETE", None)] {
        let (s, v, _) = call(
            &http,
            &idp,
            &t,
            &token,
            method,
            "/api/v1/keys/from-argo",
            body.as_ref(),
            &[],
        )
        .await;
        assert_eq!(s, 409, "{v}");
        assert!(v["detail"].as_str().unwrap().contains("GitOps"), "{v}");
    }
    assert!(!tokens.get("from-argo").await.unwrap().spec.disabled);

    // Created through the API: the key once, its hash in the CR.
    let (s, created, h) = call(
        &http,
        &idp,
        &t,
        &token,
        "POST",
        "/api/v1/keys",
        Some(&json!({"displayName": "ci"})),
        &[("idempotency-key", "create-1")],
    )
    .await;
    assert_eq!(s, 201, "{created}");
    let name = created["name"].as_str().unwrap();
    let key = created["apiKey"].as_str().unwrap();
    let cr = tokens.get(name).await.unwrap();
    assert_eq!(
        cr.spec.key_hash.as_deref(),
        Some(aigw_crds::token::hash_api_key(key).as_str())
    );
    assert_eq!(cr.spec.owner, "boss");
    assert_eq!(cr.labels().get(labels::INSTANCE), Some(&idp.instance));
    assert!(!serde_json::to_string(&cr).unwrap().contains(key));
    let etag = h.get("etag").unwrap().to_str().unwrap().to_owned();
    // A retry with the same Idempotency-Key creates no second key.
    let (s, v, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "POST",
        "/api/v1/keys",
        Some(&json!({"displayName": "ci"})),
        &[("idempotency-key", "create-1")],
    )
    .await;
    assert_eq!(s, 409, "{v}");
    assert!(v["detail"].as_str().unwrap().contains(name));
    let (_, got, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "GET",
        &format!("/api/v1/keys/{name}"),
        None,
        &[],
    )
    .await;
    assert!(
        got.get("apiKey").is_none(),
        "the key is never shown again: {got}"
    );

    // If-Match: a stale ETag is refused, the current one accepted.
    let path = format!("/api/v1/keys/{name}");
    let (s, _, h2) = call(
        &http,
        &idp,
        &t,
        &token,
        "PATCH",
        &path,
        Some(&json!({"rateLimit": 5})),
        &[("if-match", &etag)],
    )
    .await;
    assert_eq!(s, 200);
    let (s, v, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "PATCH",
        &path,
        Some(&json!({"rateLimit": 6})),
        &[("if-match", &etag)],
    )
    .await;
    assert_eq!(s, 412, "{v}");
    assert_eq!(tokens.get(name).await.unwrap().spec.rate_limit, 5);
    let fresh = h2.get("etag").unwrap().to_str().unwrap().to_owned();
    let (s, v, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "PATCH",
        &path,
        Some(&json!({"expiresAt": "not a time"})),
        &[("if-match", &fresh)],
    )
    .await;
    assert_eq!(s, 422, "the apiserver's validation answers: {v}");
    let (s, v, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "PATCH",
        &path,
        Some(&json!({"quota": 1, "colour": "red"})),
        &[],
    )
    .await;
    assert_eq!(s, 400, "unknown fields are refused: {v}");

    // Pages: 3 keys, 2 per page.
    let (_, p1, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "GET",
        "/api/v1/keys?limit=2",
        None,
        &[],
    )
    .await;
    let cursor = p1["nextCursor"].as_str().unwrap().to_owned();
    let (_, p2, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "GET",
        &format!("/api/v1/keys?limit=2&cursor={cursor}"),
        None,
        &[],
    )
    .await;
    assert_eq!(
        p1["items"].as_array().unwrap().len() + p2["items"].as_array().unwrap().len(),
        3
    );
    assert!(p2.get("nextCursor").is_none());

    // Deleted through the API: gone for kubectl too.
    let (s, _, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "DELETE",
        "/api/v1/keys/from-kubectl",
        None,
        &[],
    )
    .await;
    assert_eq!(s, 204);
    assert!(tokens.get_opt("from-kubectl").await.unwrap().is_none());
    idp.cleanup().await;
}

/// Settlement through the API: a settled period's margin is the balance; a withdrawal retried
/// with its Idempotency-Key is recorded once; parallel withdrawals never overdraw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawals_never_overdraw_and_retries_record_once() {
    let idp = Idp::start(|_| {}).await;
    let t = idp
        .tenant("money", "reseller", "Money Co", Value::Null)
        .await;
    let fin = idp.user(&t, "fin", "x", &["finance"]).await;
    let token = mint(&idp, &t, fin, &[Role::Finance]);
    let http = idp.http(&[&t]);
    // 10.00 charged in January 2026, 4.00 of it owed to the platform: margin 6.00.
    idp.clickhouse
        .query(&format!(
            "INSERT INTO usage_logs (event_id, trace_id, tenant_id, user_id, token_id, channel_id, model, \
             prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens, cost, platform_cost, \
             upstream_cost, latency_ms, status, created_at, currency) VALUES \
             ('m1', 't', {}, 1, 1, 1, 'gpt-4o', 10, 1, 0, 0, 11, 10, 4, 1, 5, 'success', toDateTime('2026-01-15 00:00:00', 'UTC'), 'USD')",
            t.id
        ))
        .execute()
        .await
        .unwrap();
    let (s, v, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "POST",
        "/api/v1/settlements",
        Some(&json!({"from": "2026-01-01", "to": "2026-02-01"})),
        &[],
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["margin"], "6.000000");
    let (_, ledger, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "GET",
        "/api/v1/settlements",
        None,
        &[],
    )
    .await;
    assert_eq!(ledger["balance"], "6.000000");

    let w = json!({"amount": "1.5", "note": "bank"});
    let (s1, v1, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "POST",
        "/api/v1/withdrawals",
        Some(&w),
        &[("idempotency-key", "w-1")],
    )
    .await;
    let (s2, v2, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "POST",
        "/api/v1/withdrawals",
        Some(&w),
        &[("idempotency-key", "w-1")],
    )
    .await;
    assert_eq!((s1, s2), (201, 201), "{v1} {v2}");
    assert_eq!(v1["id"], v2["id"], "a retry returns the first record");
    let (s, v, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "POST",
        "/api/v1/withdrawals",
        Some(&json!({"amount": "2"})),
        &[("idempotency-key", "w-1")],
    )
    .await;
    assert_eq!(s, 422, "the same key with another body: {v}");

    // 4.5 left: of six parallel withdrawals of 1.0, exactly four are recorded.
    let mut calls = Vec::new();
    for _ in 0..6 {
        let http = http.clone();
        let token = token.clone();
        let url = format!(
            "https://{}:{}/api/v1/withdrawals",
            t.domain,
            idp.addr.port()
        );
        calls.push(tokio::spawn(async move {
            http.post(url)
                .bearer_auth(token)
                .json(&json!({"amount": "1"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut codes = Vec::new();
    for c in calls {
        codes.push(c.await.unwrap());
    }
    codes.sort_unstable();
    assert_eq!(codes.iter().filter(|c| **c == 201).count(), 4, "{codes:?}");
    let (_, ledger, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "GET",
        "/api/v1/settlements",
        None,
        &[],
    )
    .await;
    assert_eq!(ledger["balance"], "0.500000", "{ledger}");
    let (s, v, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "POST",
        "/api/v1/withdrawals",
        Some(&json!({"amount": "0.5000001"})),
        &[],
    )
    .await;
    assert_eq!(s, 422, "{v}");
    sqlx::query("DELETE FROM settlements WHERE tenant_id = ?")
        .bind(t.id)
        .execute(&idp.db)
        .await
        .unwrap();
    idp.cleanup().await;
}

/// Bad input: unknown routes, wrong methods, malformed ids and bodies, oversized bodies — each a
/// 4xx problem+json; the OpenAPI document is served without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_problem_details() {
    let idp = Idp::start(|_| {}).await;
    let t = idp
        .tenant("bad", "reseller", "Bad Input Co", Value::Null)
        .await;
    let owner = idp.user(&t, "boss", "x", &["owner"]).await;
    let token = mint(&idp, &t, owner, &[Role::Owner]);
    let http = idp.http(&[&t]);
    for (method, path, body, want) in [
        ("GET", "/api/v1/nothing", None, 404),
        ("DELETE", "/api/v1/usage", None, 405),
        (
            "PATCH",
            "/api/v1/members/abc",
            Some(json!({"active": true})),
            400,
        ),
        (
            "PATCH",
            "/api/v1/members/1",
            Some(json!({"active": "yes"})),
            400,
        ),
        ("GET", "/api/v1/keys?limit=0", None, 400),
        ("GET", "/api/v1/keys?cursor=%%%", None, 400),
        (
            "GET",
            "/api/v1/usage?from=2026-02-01&to=2026-01-01",
            None,
            422,
        ),
        ("GET", "/api/v1/usage?groupBy=colour", None, 400),
        (
            "PUT",
            "/api/v1/members/1/roles",
            Some(json!({"roles": ["king"]})),
            422,
        ),
    ] {
        let (s, v, _) = call(&http, &idp, &t, &token, method, path, body.as_ref(), &[]).await;
        assert_eq!(s, want, "{method} {path}: {v}");
        assert!(v["title"].is_string() && v["status"] == want, "{v}");
    }
    let url = format!("https://{}:{}/api/v1/keys", t.domain, idp.addr.port());
    let big = vec![b'x'; aigw_apiserver::api::MAX_BODY + 1];
    let resp = http
        .post(&url)
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401, "no token");
    let doc: Value = http
        .get(format!(
            "https://{}:{}/api/v1/openapi.json",
            t.domain,
            idp.addr.port()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["paths"].as_object().unwrap().len(), 19);
    idp.cleanup().await;
}

#[test]
fn every_endpoint_is_in_the_sweep() {
    // The sweep iterates ENDPOINTS itself; this guards that the table is not empty and that the
    // write endpoints are all there (a route dropped from the table would not be swept).
    assert!(ENDPOINTS.iter().filter(|e| e.op == Op::Write).count() >= 13);
}

/// Every REST write is a `tenant.events` record (the one `TenantEvent` shape the operator's
/// records have), keyed by the tenant, naming the actor and the object; read back from Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_tenant_events_on_kafka() {
    use rdkafka::{
        ClientConfig, Message, Offset, TopicPartitionList,
        consumer::{BaseConsumer, Consumer},
    };
    let idp = Idp::start(|_| {}).await;
    let t = idp
        .tenant("events", "reseller", "Events Co", Value::Null)
        .await;
    ensure_namespace(&idp, &t).await;
    let owner = idp.user(&t, "boss", "x", &["owner"]).await;
    let token = mint(&idp, &t, owner, &[Role::Owner]);
    let http = idp.http(&[&t]);

    // Read every partition from its current end: only what follows counts.
    let tb = aigw_testkit::Testbed::load().unwrap();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", tb.kafka_brokers().unwrap())
        .set("group.id", aigw_testkit::unique_name("api-events"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let topic = aigw_common::events::TENANT_EVENTS;
    let meta = consumer
        .fetch_metadata(Some(topic), std::time::Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in meta.topics()[0].partitions() {
        let (_, high) = consumer
            .fetch_watermarks(topic, p.id(), std::time::Duration::from_secs(10))
            .unwrap();
        tpl.add_partition_offset(topic, p.id(), Offset::Offset(high))
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();

    let (s, created, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "POST",
        "/api/v1/keys",
        Some(&json!({"displayName": "ev"})),
        &[],
    )
    .await;
    assert_eq!(s, 201, "{created}");
    let name = created["name"].as_str().unwrap().to_owned();
    let (s, _, _) = call(
        &http,
        &idp,
        &t,
        &token,
        "DELETE",
        &format!("/api/v1/keys/{name}"),
        None,
        &[],
    )
    .await;
    assert_eq!(s, 204);

    let mut seen: Vec<aigw_common::events::TenantEvent> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while seen.len() < 2 && std::time::Instant::now() < deadline {
        let Some(msg) =
            tokio::task::block_in_place(|| consumer.poll(std::time::Duration::from_millis(200)))
        else {
            continue;
        };
        let msg = msg.unwrap();
        if msg.key() != Some(t.name.as_bytes()) {
            continue;
        }
        seen.push(serde_json::from_slice(msg.payload().unwrap()).unwrap());
    }
    let object = format!("token/{name}");
    let got: Vec<(&str, Option<i64>, Option<&str>, i64)> = seen
        .iter()
        .map(|e| (e.event.as_str(), e.actor, e.object.as_deref(), e.tenant_id))
        .collect();
    assert_eq!(
        got,
        [
            ("key.created", Some(owner), Some(object.as_str()), t.id),
            ("key.deleted", Some(owner), Some(object.as_str()), t.id)
        ]
    );
    idp.cleanup().await;
}
