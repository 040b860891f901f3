//! The authz gate through its real HTTP listener, with Token and Tenant CRs in the test bed's
//! kube-apiserver and quota/rate state in its Redis. No operator runs here: the tests write the
//! CR statuses the operator would (tenant id and served domains, token id and phase).

// Test code: a failed unwrap is a failed test with its message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use aigw_apiserver::authz::{
    index::Index,
    service::{self, Authz, Settings},
};
use aigw_common::{
    ops,
    quota::{PendingKeys, TokenKeys},
    shutdown::Shutdown,
};
use aigw_crds::{Tenant, Token, labels};
use aigw_testkit::{
    Testbed,
    process::{HttpResponse, http_send},
    unique_name,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

struct Gate {
    client: Client,
    addr: SocketAddr,
    instance: String,
    redis: redis::Client,
    /// This gate's own pending keys (removed on drop).
    pending: PendingKeys,
    /// Tenants this gate created (removed, with their namespaces, by `cleanup`).
    created: std::sync::Mutex<Vec<String>>,
    _shutdown: Shutdown,
}

impl Drop for Gate {
    fn drop(&mut self) {
        // Tests clean up after themselves: no pending request of theirs is left to be swept.
        if let Ok(mut c) = self.redis.get_connection() {
            let _: redis::RedisResult<()> = redis::cmd("DEL")
                .arg(&self.pending.set)
                .arg(&self.pending.events)
                .query(&mut c);
        }
    }
}

fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Gate {
    async fn start(fail_open: bool, redis_url: Option<&str>) -> Self {
        Self::start_capped(fail_open, redis_url, 0).await
    }

    async fn start_capped(fail_open: bool, redis_url: Option<&str>, max_in_flight: i64) -> Self {
        let tb = Testbed::load().unwrap();
        let client = tb.kube_client().await.unwrap();
        aigw_crds::install(&client, "aigw-test").await.unwrap();
        let instance = unique_name("authz");
        let index = Index::default();
        tokio::spawn(index.clone().run(
            client.clone(),
            Some(format!("{}={instance}", labels::INSTANCE)),
        ));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !index.synced() {
            assert!(Instant::now() < deadline, "index did not sync");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let redis = tb.redis().unwrap();
        let target =
            redis::Client::open(redis_url.unwrap_or(tb.var("REDIS_URL").unwrap())).unwrap();
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(Duration::from_millis(200)))
            .set_response_timeout(Some(Duration::from_millis(500)));
        let manager = redis::aio::ConnectionManager::new_lazy_with_config(target, config).unwrap();
        let pending = PendingKeys::under(&format!("test:{instance}:pending"));
        let settings = Settings {
            reserve_estimate: 4096,
            max_in_flight,
            pending: pending.clone(),
            reservation_ttl_ms: 60_000,
            fail_open,
        };
        let metrics =
            service::Metrics::register(&mut prometheus_client::registry::Registry::default());
        let shutdown = Shutdown::new();
        let (addr, _) = ops::serve(
            "127.0.0.1:0".parse().unwrap(),
            service::router(Authz::new(index, manager, settings, metrics)),
            shutdown.clone(),
        )
        .await
        .unwrap();
        Self {
            client,
            addr,
            instance,
            redis,
            pending,
            created: std::sync::Mutex::default(),
            _shutdown: shutdown,
        }
    }

    /// Deletes the tenants this gate created and their namespaces (tokens go with them).
    async fn cleanup(&self) {
        let names = std::mem::take(&mut *self.created.lock().unwrap());
        for name in names {
            let _ = Api::<Tenant>::all(self.client.clone())
                .delete(&name, &DeleteParams::default())
                .await;
            let _ = Api::<Namespace>::all(self.client.clone())
                .delete(&format!("aigw-{name}"), &DeleteParams::default())
                .await;
        }
    }

    /// A tenant serving `domains`, with the status the operator would write.
    async fn tenant(&self, name: &str, id: i64, domains: &[&str], suspended: bool) {
        self.created.lock().unwrap().push(name.to_owned());
        let api: Api<Tenant> = Api::all(self.client.clone());
        let t: Tenant = serde_json::from_value(json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
            "metadata": {"name": name, "labels": {labels::INSTANCE: self.instance}},
            "spec": {"type": "reseller", "displayName": name, "domains": domains, "suspended": suspended}}))
        .unwrap();
        api.create(&PostParams::default(), &t).await.unwrap();
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"tenantId": id, "domains": domains}})),
        )
        .await
        .unwrap();
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": format!("aigw-{name}")}})).unwrap();
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
    }

    /// A token with key `key`; `status` is merged into its status (tokenId 7 by default).
    async fn token(&self, tenant: &str, name: &str, key: &str, spec: Value, status: Value) {
        let api: Api<Token> = Api::namespaced(self.client.clone(), &format!("aigw-{tenant}"));
        let mut s = json!({"owner": "alice", "keyHash": hash(key), "keyPrefix": &key[..7]});
        for (k, v) in spec.as_object().unwrap() {
            s[k] = v.clone();
        }
        let t: Token = serde_json::from_value(
            json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Token",
            "metadata": {"name": name, "labels": {labels::INSTANCE: self.instance}}, "spec": s}),
        )
        .unwrap();
        api.create(&PostParams::default(), &t).await.unwrap();
        let mut st = json!({"tokenId": 7, "phase": "Active", "keyHash": hash(key)});
        for (k, v) in status.as_object().unwrap() {
            st[k] = v.clone();
        }
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": st})),
        )
        .await
        .unwrap();
    }

    /// A chat completion for `model` (default gpt-4o) with `max_tokens` 4000, as ext-auth forwards it.
    fn call(&self, host: &str, key: Option<&str>, model: Option<&str>) -> HttpResponse {
        self.call_with(
            host,
            key,
            None,
            "/v1/chat/completions",
            &chat(model.unwrap_or("gpt-4o"), Some(4000)),
        )
    }

    fn call_with(
        &self,
        host: &str,
        key: Option<&str>,
        header_model: Option<&str>,
        uri: &str,
        body: &str,
    ) -> HttpResponse {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut h: Vec<(&str, &str)> = vec![
            ("x-forwarded-host", host),
            ("x-forwarded-uri", uri),
            ("x-forwarded-method", "POST"),
            ("content-type", "application/json"),
        ];
        if let Some(a) = &auth {
            h.push(("authorization", a));
        }
        if let Some(m) = header_model {
            h.push(("x-higress-llm-model", m));
        }
        http_send(self.addr, "POST", "/authz", &h, body.as_bytes()).unwrap()
    }

    /// Waits until `check` holds for the response (the index follows watches).
    async fn until(
        &self,
        host: &str,
        key: &str,
        check: impl Fn(&HttpResponse) -> bool,
    ) -> HttpResponse {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.call(host, Some(key), None);
            if check(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "last answer: {} {}",
                r.status,
                r.body
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One authz request on its own connection, async, so a thousand can be in flight at once.
async fn post_status(addr: SocketAddr, host: &str, key: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .expect("connect timed out")
    .unwrap();
    let body = chat("gpt-4o", Some(4000));
    let req = format!(
        "POST /authz HTTP/1.1\r\nhost: authz\r\nconnection: close\r\ncontent-length: {}\r\n\
         x-forwarded-host: {host}\r\nx-forwarded-uri: /v1/chat/completions\r\n\
         authorization: Bearer {key}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A chat completion body.
fn chat(model: &str, max_tokens: Option<i64>) -> String {
    let mut v = json!({"model": model, "messages": [{"role": "user", "content": "hello"}]});
    if let Some(m) = max_tokens {
        v["max_tokens"] = json!(m);
    }
    v.to_string()
}

/// What authz reserves for `body` with the given output limit.
fn estimate(body: &str, output: i64) -> i64 {
    i64::try_from(body.len().div_ceil(3)).unwrap() + output
}

fn code(r: &HttpResponse) -> String {
    let v: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    v["error"]["code"].as_str().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_path() {
    let g = Gate::start(false, None).await;
    let sfx = unique_name("t");
    let (acme, globex, frozen) = (
        format!("acme-{sfx}"),
        format!("globex-{sfx}"),
        format!("frozen-{sfx}"),
    );
    let acme_host = format!("api.{acme}.example");
    g.tenant(&acme, 41, &[&acme_host, &format!("*.{acme}.dev")], false)
        .await;
    g.tenant(&globex, 42, &[&format!("api.{globex}.example")], false)
        .await;
    g.tenant(&frozen, 43, &[&format!("api.{frozen}.example")], true)
        .await;
    let key = |n: &str| format!("sk-{n}-{sfx}");
    g.token(
        &acme,
        "ok",
        &key("ok"),
        json!({"models": ["gpt-4o"], "quota": 1_000_000, "rateLimit": 1000}),
        json!({}),
    )
    .await;
    g.token(
        &acme,
        "off",
        &key("off"),
        json!({"disabled": true}),
        json!({}),
    )
    .await;
    g.token(
        &acme,
        "old",
        &key("old"),
        json!({"expiresAt": "2020-01-01T00:00:00Z"}),
        json!({}),
    )
    .await;
    g.token(
        &acme,
        "spent",
        &key("spent"),
        json!({"quota": 10}),
        json!({"phase": "Exhausted"}),
    )
    .await;
    g.token(
        &acme,
        "slow",
        &key("slow"),
        json!({"rateLimit": 2}),
        json!({}),
    )
    .await;
    g.token(
        &acme,
        "small",
        &key("small"),
        json!({"quota": 10_000}),
        json!({}),
    )
    .await;
    g.token(&frozen, "f", &key("f"), json!({}), json!({})).await;

    // Allowed: the headers Higress passes upstream.
    let ok = g.until(&acme_host, &key("ok"), |r| r.status == 200).await;
    assert_eq!(ok.header("x-aigw-tenant"), Some("41"));
    assert_eq!(ok.header("x-aigw-user"), Some("alice"));
    assert_eq!(ok.header("x-aigw-token"), Some("7"));
    assert_eq!(ok.header("x-mse-consumer"), Some("7"));
    let reservation = ok.header("x-aigw-reservation").unwrap();
    let est = estimate(&chat("gpt-4o", Some(4000)), 4000);
    assert!(reservation.ends_with(&format!(":{est}")), "{reservation}");
    let event_id = ok.header("x-aigw-event-id").unwrap().to_owned();
    assert!(reservation.starts_with(&event_id), "one id per request");
    // Wildcard domain, x-api-key, an allowed model named in the header as well.
    let body = chat("gpt-4o", None);
    let r = http_send(
        g.addr,
        "POST",
        "/authz",
        &[
            ("x-forwarded-host", &format!("eu.{acme}.dev")),
            ("x-forwarded-uri", "/v1/chat/completions"),
            ("x-api-key", &key("ok")),
            ("x-higress-llm-model", "gpt-4o"),
        ],
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("x-aigw-estimate"),
        Some(format!("{}:4096", body.len().div_ceil(3)).as_str()),
        "no max_tokens: the default output reserve"
    );
    assert_ne!(r.header("x-aigw-event-id"), Some(event_id.as_str()));

    // Refusals, each with an OpenAI-style body.
    let unknown = g.call(&acme_host, Some("sk-nobody"), None);
    assert_eq!(
        (unknown.status, code(&unknown).as_str()),
        (401, "invalid_api_key")
    );
    assert_eq!(
        serde_json::from_str::<Value>(&unknown.body).unwrap()["error"]["type"],
        "invalid_request_error"
    );
    let none = g.call(&acme_host, None, None);
    assert_eq!(
        (none.status, code(&none).as_str()),
        (401, "invalid_api_key")
    );
    let elsewhere = g.call(&format!("api.{globex}.example"), Some(&key("ok")), None);
    assert_eq!(
        (elsewhere.status, elsewhere.body.clone()),
        (401, unknown.body.clone()),
        "no hint the key exists elsewhere"
    );
    let r = g.until(&acme_host, &key("off"), |r| r.status != 401).await;
    assert_eq!((r.status, code(&r).as_str()), (403, "api_key_disabled"));
    let r = g.until(&acme_host, &key("old"), |r| r.status != 401).await;
    assert_eq!((r.status, code(&r).as_str()), (403, "api_key_expired"));
    let r = g
        .until(&acme_host, &key("spent"), |r| r.status != 401)
        .await;
    assert_eq!((r.status, code(&r).as_str()), (429, "insufficient_quota"));
    let r = g.call(&acme_host, Some(&key("ok")), Some("claude-sonnet-4"));
    assert_eq!((r.status, code(&r).as_str()), (403, "model_not_allowed"));
    let r = g
        .until(&format!("api.{frozen}.example"), &key("f"), |r| {
            r.status != 401
        })
        .await;
    assert_eq!((r.status, code(&r).as_str()), (403, "account_suspended"));

    // RPM: 2 per minute, the third is refused with Retry-After.
    g.until(&acme_host, &key("slow"), |r| r.status == 200).await;
    assert_eq!(g.call(&acme_host, Some(&key("slow")), None).status, 200);
    let r = g.call(&acme_host, Some(&key("slow")), None);
    assert_eq!((r.status, code(&r).as_str()), (429, "rate_limit_exceeded"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");

    // Quota: 10,000 tokens cover two estimates of ~4,030 tokens, not three.
    assert!(est * 2 <= 10_000 && est * 3 > 10_000, "{est}");
    g.until(&acme_host, &key("small"), |r| r.status == 200)
        .await;
    assert_eq!(g.call(&acme_host, Some(&key("small")), None).status, 200);
    let r = g.call(&acme_host, Some(&key("small")), None);
    assert_eq!((r.status, code(&r).as_str()), (429, "insufficient_quota"));

    // Revocation takes effect within a second; deletion makes the key unknown.
    let tokens: Api<Token> = Api::namespaced(g.client.clone(), &format!("aigw-{acme}"));
    let revoked = Instant::now();
    tokens
        .patch(
            "ok",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"disabled": true}})),
        )
        .await
        .unwrap();
    g.until(&acme_host, &key("ok"), |r| r.status == 403).await;
    assert!(
        revoked.elapsed() < Duration::from_secs(1),
        "revocation took {:?}",
        revoked.elapsed()
    );
    tokens.delete("ok", &DeleteParams::default()).await.unwrap();
    let r = g.until(&acme_host, &key("ok"), |r| r.status == 401).await;
    assert_eq!(code(&r), "invalid_api_key");
    g.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_reserve_at_most_the_quota() {
    let g = Gate::start(false, None).await;
    let sfx = unique_name("c");
    let tenant = format!("busy-{sfx}");
    let host = format!("api.{tenant}.example");
    g.tenant(&tenant, 50, &[&host], false).await;
    let key = format!("sk-busy-{sfx}");
    // Quota for exactly 100 estimates.
    let est = estimate(&chat("gpt-4o", Some(4000)), 4000);
    g.token(
        &tenant,
        "busy",
        &key,
        json!({"quota": est * 100, "rateLimit": 0}),
        json!({}),
    )
    .await;
    g.until(&host, &key, |r| r.status != 401).await; // indexed (this first call reserves one)

    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (addr, host, key) = (g.addr, host.clone(), key.clone());
        tasks.push(tokio::spawn(
            async move { post_status(addr, &host, &key).await },
        ));
    }
    let mut admitted = 1; // the indexing call above
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => admitted += 1,
            429 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted, 100, "{refused} refused");
    let mut c = g.redis.get_multiplexed_async_connection().await.unwrap();
    let reserved: i64 = redis::cmd("GET")
        .arg(TokenKeys::new(&hash(&key)).reserved)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        reserved,
        est * 100,
        "reserved total never exceeds the quota"
    );
    g.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_or_open_as_configured() {
    let sfx = unique_name("r");
    for fail_open in [false, true] {
        let g = Gate::start(fail_open, Some("redis://127.0.0.1:1/")).await;
        let tenant = format!("nored-{fail_open}-{sfx}");
        let host = format!("api.{tenant}.example");
        g.tenant(&tenant, 60, &[&host], false).await;
        let key = format!("sk-nored-{fail_open}-{sfx}");
        g.token(&tenant, "k", &key, json!({"quota": 100_000}), json!({}))
            .await;
        let r = g.until(&host, &key, |r| r.status != 401).await;
        if fail_open {
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(r.header("x-aigw-reservation"), Some("none"));
        } else {
            assert_eq!((r.status, code(&r).as_str()), (503, "authz_unavailable"));
        }
        g.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_asked_for_is_read_from_the_request() {
    let g = Gate::start_capped(false, None, 2).await;
    let sfx = unique_name("q");
    let tenant = format!("shape-{sfx}");
    let host = format!("api.{tenant}.example");
    g.tenant(&tenant, 70, &[&host], false).await;
    let key = |n: &str| format!("sk-{n}-{sfx}");
    g.token(
        &tenant,
        "big",
        &key("big"),
        json!({"quota": 10_000, "rateLimit": 0}),
        json!({}),
    )
    .await;
    g.token(
        &tenant,
        "tiny",
        &key("tiny"),
        json!({"quota": 1_000, "rateLimit": 0, "models": ["gpt-4o"]}),
        json!({}),
    )
    .await;
    g.until(&host, &key("big"), |r| r.status != 401).await;
    g.until(&host, &key("tiny"), |r| r.status != 401).await;
    let mut c = g.redis.get_multiplexed_async_connection().await.unwrap();
    let reserved = |k: String| {
        let mut c = c.clone();
        async move {
            redis::cmd("GET")
                .arg(TokenKeys::new(&hash(&k)).reserved)
                .query_async::<Option<i64>>(&mut c)
                .await
                .unwrap()
                .unwrap_or(0)
        }
    };
    // Two concurrent 120k-token requests on a 10,000-token quota: neither is admitted.
    let large = chat("gpt-4o", Some(120_000));
    let (first, second) = tokio::join!(
        async {
            g.call_with(
                &host,
                Some(&key("big")),
                None,
                "/v1/chat/completions",
                &large,
            )
        },
        async {
            g.call_with(
                &host,
                Some(&key("big")),
                None,
                "/v1/chat/completions",
                &large,
            )
        },
    );
    for r in [&first, &second] {
        assert_eq!(
            (r.status, code(r).as_str()),
            (429, "insufficient_quota"),
            "{}",
            r.body
        );
    }
    // A quota below the default output reserve still serves a request that asks for little.
    let small = chat("gpt-4o", Some(100));
    let r = g.call_with(
        &host,
        Some(&key("tiny")),
        None,
        "/v1/chat/completions",
        &small,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(reserved(key("tiny")).await, estimate(&small, 100));
    let r = g.call_with(
        &host,
        Some(&key("tiny")),
        None,
        "/v1/chat/completions",
        &chat("gpt-4o", None),
    );
    assert_eq!((r.status, code(&r).as_str()), (429, "insufficient_quota"));
    // At most two in flight per token (this gate's cap): the third waits for a settle.
    for _ in 0..1 {
        let r = g.call_with(
            &host,
            Some(&key("tiny")),
            None,
            "/v1/chat/completions",
            &small,
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = g.call_with(
        &host,
        Some(&key("tiny")),
        None,
        "/v1/chat/completions",
        &small,
    );
    assert_eq!(
        (r.status, code(&r).as_str()),
        (429, "too_many_requests_in_flight")
    );

    // Endpoints that cannot be metered, usage switched off, a model header that lies.
    let r = g.call_with(
        &host,
        Some(&key("big")),
        None,
        "/v1/images/generations",
        &chat("dall-e-3", None),
    );
    assert_eq!((r.status, code(&r).as_str()), (404, "unsupported_endpoint"));
    let no_usage = json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": false}, "max_tokens": 10}).to_string();
    let r = g.call_with(
        &host,
        Some(&key("big")),
        None,
        "/v1/chat/completions",
        &no_usage,
    );
    assert_eq!(
        (r.status, code(&r).as_str()),
        (400, "stream_usage_required")
    );
    let r = g.call_with(
        &host,
        Some(&key("tiny")),
        Some("gpt-4o"),
        "/v1/chat/completions",
        &chat("o1-pro", Some(10)),
    );
    assert_eq!(
        (r.status, code(&r).as_str()),
        (400, "model_mismatch"),
        "a header cannot launder a model"
    );
    let r = g.call_with(
        &host,
        Some(&key("tiny")),
        None,
        "/v1/chat/completions",
        &chat("o1-pro", Some(10)),
    );
    assert_eq!((r.status, code(&r).as_str()), (403, "model_not_allowed"));
    let r = g.call_with(
        &host,
        Some(&key("big")),
        None,
        "/v1/chat/completions",
        "not json",
    );
    assert_eq!((r.status, code(&r).as_str()), (400, "invalid_request_body"));

    // Every admitted request is pending until billed: the estimate is what the sweep would bill.
    let r = g.call_with(
        &host,
        Some(&key("big")),
        None,
        "/v1/embeddings",
        r#"{"model":"text-embedding-3-small","input":"hi"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.header("x-aigw-event-id").unwrap();
    let raw: String = redis::cmd("HGET")
        .arg(&g.pending.events)
        .arg(id)
        .query_async(&mut c)
        .await
        .unwrap();
    let pending = aigw_plugin_core::UsageEvent::parse(raw.as_bytes()).unwrap();
    assert_eq!(pending.event_id, id);
    assert_eq!(pending.tenant, "70");
    assert_eq!(pending.model, "text-embedding-3-small");
    let e = pending.estimate.unwrap();
    assert_eq!((e.prompt_tokens, e.completion_tokens), (Some(16), Some(0)));
    g.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_tenants_being_deleted_or_not_mirrored_are_refused() {
    let g = Gate::start(false, None).await;
    let sfx = unique_name("d");
    let (live, going) = (format!("live-{sfx}"), format!("going-{sfx}"));
    let (live_host, going_host) = (
        format!("api.{live}.example"),
        format!("api.{going}.example"),
    );
    g.tenant(&live, 80, &[&live_host], false).await;
    g.tenant(&going, 81, &[&going_host], false).await;
    let key = |n: &str| format!("sk-{n}-{sfx}");
    g.token(&live, "held", &key("held"), json!({}), json!({}))
        .await;
    g.token(
        &live,
        "fresh",
        &key("fresh"),
        json!({}),
        json!({"tokenId": null}),
    )
    .await;
    g.token(&going, "t", &key("t"), json!({}), json!({})).await;
    g.until(&live_host, &key("held"), |r| r.status == 200).await;
    g.until(&going_host, &key("t"), |r| r.status == 200).await;
    // Not mirrored yet: its usage could not be settled, so it is not admitted.
    let r = g.call(&live_host, Some(&key("fresh")), None);
    assert_eq!((r.status, code(&r).as_str()), (401, "invalid_api_key"));
    // A finalizer keeps a deleted Token (and Tenant) visible; they must stop at once anyway.
    let hold = json!({"metadata": {"finalizers": ["test.aigateway.io/hold"]}});
    let tokens: Api<Token> = Api::namespaced(g.client.clone(), &format!("aigw-{live}"));
    tokens
        .patch("held", &PatchParams::default(), &Patch::Merge(&hold))
        .await
        .unwrap();
    tokens
        .delete("held", &DeleteParams::default())
        .await
        .unwrap();
    g.until(&live_host, &key("held"), |r| r.status == 401).await;
    let tenants: Api<Tenant> = Api::all(g.client.clone());
    tenants
        .patch(&going, &PatchParams::default(), &Patch::Merge(&hold))
        .await
        .unwrap();
    tenants
        .delete(&going, &DeleteParams::default())
        .await
        .unwrap();
    g.until(&going_host, &key("t"), |r| r.status == 401).await;
    // Let them go.
    let release = json!({"metadata": {"finalizers": null}});
    tokens
        .patch("held", &PatchParams::default(), &Patch::Merge(&release))
        .await
        .unwrap();
    tenants
        .patch(&going, &PatchParams::default(), &Patch::Merge(&release))
        .await
        .unwrap();
    g.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_quota_counter_is_reseeded_from_billings_published_total() {
    // Redis lost the token's `used` counter (a flush, a failover without persistence). The quota
    // must not restart at 0: authz re-seeds it from status.usedQuota, billing's published total.
    let g = Gate::start(false, None).await;
    let sfx = unique_name("f");
    let tenant = format!("flush-{sfx}");
    let host = format!("api.{tenant}.example");
    g.tenant(&tenant, 90, &[&host], false).await;
    let key = format!("sk-flush-{sfx}");
    g.token(
        &tenant,
        "t",
        &key,
        json!({"quota": 10_000, "rateLimit": 0}),
        json!({"usedQuota": 9_900}),
    )
    .await;
    // The default request (max_tokens 4000) is more than the 100 tokens left.
    let r = g.until(&host, &key, |r| r.status != 401).await;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (429, "insufficient_quota"),
        "{}",
        r.body
    );
    let mut c = g.redis.get_multiplexed_async_connection().await.unwrap();
    let used: i64 = redis::cmd("GET")
        .arg(TokenKeys::new(&hash(&key)).used)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(used, 9_900, "re-seeded");
    // Under the published total a small request still passes.
    let tiny = json!({"model": "gpt-4o", "max_tokens": 1}).to_string();
    let r = g.call_with(&host, Some(&key), None, "/v1/chat/completions", &tiny);
    assert_eq!(r.status, 200, "{}", r.body);
    g.cleanup().await;
}
