//! The data-plane test bed, shared by `tests/dataplane.rs` and `benches/dataplane.rs`: an
//! operator (writing the Higress objects), the real authz and ingest in-process, the provider
//! stand-in, and the Higress stand-in gateway built from what the operator wrote, read back from
//! the kube-apiserver.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::common::{Harness, eventually};
use aigw_apiserver::authz::{
    index::Index,
    service::{self, Authz, Settings},
};
use aigw_common::{ops, quota::PendingKeys, shutdown::Shutdown};
use aigw_crds::{Channel, Tenant, Token, labels};
use aigw_plugin_core::UsageEvent;
use aigw_standin::{
    gateway::{Gateway, Request, Response},
    objects::{self, Objects},
    plugins,
    provider::Provider,
};
use aigw_testkit::Testbed;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use rdkafka::{
    ClientConfig, Message,
    consumer::{Consumer, StreamConsumer},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const INGEST_SECRET: &str = "dataplane-ingest-secret-0123456789";
pub const PROVIDER_KEY: &str = "sk-provider-upstream-key";

/// The servers of one test: operator, authz, ingest, provider, and the names it created.
pub struct Bed {
    pub h: Harness,
    pub shutdown: Shutdown,
    pub operator: Option<tokio::task::JoinHandle<()>>,
    pub provider: Provider,
    pub authz: SocketAddr,
    pub ingest: SocketAddr,
    pub topic: String,
    pub redis: redis::Client,
    pub pending: PendingKeys,
    /// authz's index (a shared handle): tests wait until it knows their tokens.
    pub index: Index,
    pub tenants: Vec<String>,
    pub secrets: Vec<String>,
}

pub fn sha(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Bed {
    /// [`Bed::start`] for the test `name`, if Higress's plugin builds and the recorded responses
    /// are there (`aigw_standin::plugins::reference_available`: a message and `None` outside CI
    /// without them, a failure under CI).
    pub async fn for_test(name: &str) -> Option<Self> {
        if aigw_standin::plugins::reference_available(name).unwrap() {
            Some(Self::start().await)
        } else {
            None
        }
    }

    pub async fn start() -> Self {
        let h = Harness::new().await;
        let (_ctx, shutdown, operator) = h.start_configured(|c| {
            INGEST_SECRET.clone_into(&mut c.ingest_secret);
            c.usage_reporter_image = "oci://registry.example/aigw-plugin:test".into();
        });
        let tb = Testbed::load().unwrap();
        // authz, as the apiserver runs it.
        let index = Index::default();
        tokio::spawn(index.clone().run(
            h.client.clone(),
            Some(format!("{}={}", labels::INSTANCE, h.instance)),
        ));
        let watching = index.clone();
        let redis = tb.redis().unwrap();
        let manager = redis::aio::ConnectionManager::new(redis.clone())
            .await
            .unwrap();
        let pending = PendingKeys::under(&format!("test:{}:pending", h.instance));
        let settings = Settings {
            reserve_estimate: 4096,
            max_in_flight: 0,
            pending: pending.clone(),
            reservation_ttl_ms: 60_000,
            fail_open: false,
        };
        let metrics =
            service::Metrics::register(&mut prometheus_client::registry::Registry::default());
        let (authz, _) = ops::serve(
            "127.0.0.1:0".parse().unwrap(),
            service::router(Authz::new(index, manager, settings, metrics)),
            shutdown.clone(),
        )
        .await
        .unwrap();
        // ingest, as billing runs it.
        let topic = format!("aigw-dataplane-{}", h.sfx);
        let admin: rdkafka::admin::AdminClient<_> = ClientConfig::new()
            .set("bootstrap.servers", tb.kafka_brokers().unwrap())
            .create()
            .unwrap();
        let dlq = format!("{topic}-dlq");
        for r in admin
            .create_topics(
                &[
                    rdkafka::admin::NewTopic::new(
                        &topic,
                        1,
                        rdkafka::admin::TopicReplication::Fixed(1),
                    ),
                    rdkafka::admin::NewTopic::new(
                        &dlq,
                        1,
                        rdkafka::admin::TopicReplication::Fixed(1),
                    ),
                ],
                &rdkafka::admin::AdminOptions::default(),
            )
            .await
            .unwrap()
        {
            r.unwrap();
        }
        let producer =
            aigw_billing::ingest::producer(tb.kafka_brokers().unwrap(), Duration::from_secs(5))
                .unwrap();
        let ingest_settings = aigw_billing::ingest::Settings {
            topic: topic.clone(),
            dlq_topic: dlq,
            secret: INGEST_SECRET.to_owned(),
            produce_timeout: Duration::from_secs(5),
        };
        let ingest_metrics = aigw_billing::ingest::Metrics::register(
            &mut prometheus_client::registry::Registry::default(),
        );
        let (ingest, _) = ops::serve(
            "127.0.0.1:0".parse().unwrap(),
            aigw_billing::ingest::router(ingest_settings, producer, ingest_metrics),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let provider = Provider::start().await.unwrap();
        Self {
            h,
            shutdown,
            operator: Some(operator),
            provider,
            authz,
            ingest,
            topic,
            redis,
            pending,
            index: watching,
            tenants: Vec::new(),
            secrets: Vec::new(),
        }
    }

    /// A Channel of `provider` serving `models`, its key in a Secret of the credentials namespace.
    pub async fn channel(&mut self, name: &str, spec: Value) {
        self.channel_keyed(name, spec, PROVIDER_KEY).await;
    }

    pub async fn channel_keyed(&mut self, name: &str, spec: Value, key: &str) {
        let secret_name = format!("{name}-key");
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": secret_name, "namespace": "aigw-system"},
            "stringData": {"apiKey": key}}))
        .unwrap();
        Api::<Secret>::namespaced(self.h.client.clone(), "aigw-system")
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        self.secrets.push(secret_name.clone());
        let mut spec = spec;
        spec["credentials"] =
            json!({"name": secret_name, "namespace": "aigw-system", "key": "apiKey"});
        let channel: Channel = serde_json::from_value(json!({
            "apiVersion": "aigateway.io/v1alpha1", "kind": "Channel",
            "metadata": {"name": name, "labels": {labels::INSTANCE: self.h.instance}},
            "spec": spec}))
        .unwrap();
        let api: Api<Channel> = Api::all(self.h.client.clone());
        api.create(&PostParams::default(), &channel).await.unwrap();
    }

    /// A tenant serving `domain` with one token of `key` allowed `models`; returns (tenant id,
    /// token id).
    pub async fn tenant(
        &mut self,
        name: &str,
        domain: &str,
        key: &str,
        models: &[&str],
    ) -> (i64, i64) {
        self.tenant_with(name, domain, &[("main", key, models, json!({}))])
            .await
    }

    /// What the cost measures run on: a `gpt-4o` channel, a tenant `<prefix>-<sfx>` on
    /// `api.<tenant>.example` with key `sk-<prefix>-<sfx>` allowed `gpt-4o`, and the gateway.
    /// Returns (domain, key, gateway).
    pub async fn gpt4o_tenant(&mut self, prefix: &str) -> (String, String, Arc<Mutex<Gateway>>) {
        let sfx = self.h.sfx.clone();
        self.channel(
            &format!("{prefix}-{sfx}"),
            json!({"provider": "openai", "models": ["gpt-4o"]}),
        )
        .await;
        let tenant = format!("{prefix}-{sfx}");
        let domain = format!("api.{tenant}.example");
        let key = format!("sk-{prefix}-{sfx}");
        self.tenant(&tenant, &domain, &key, &["gpt-4o"]).await;
        let gw = self.gateway(&["gpt-4o"]).await;
        (domain, key, gw)
    }

    /// A tenant serving `domain` with tokens (name, key, models, extra spec fields); returns
    /// (tenant id, id of the first token).
    pub async fn tenant_with(
        &mut self,
        name: &str,
        domain: &str,
        tokens: &[(&str, &str, &[&str], Value)],
    ) -> (i64, i64) {
        let t: Tenant = serde_json::from_value(json!({
            "apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
            "metadata": {"name": name, "labels": {labels::INSTANCE: self.h.instance}},
            "spec": {"type": "reseller", "displayName": name, "domains": [domain]}}))
        .unwrap();
        let tenants: Api<Tenant> = Api::all(self.h.client.clone());
        tenants.create(&PostParams::default(), &t).await.unwrap();
        self.tenants.push(name.to_owned());
        let t = self.h.ready(&tenants, name).await;
        eventually(&format!("authz knows tenant {name}"), || async {
            self.index.tenant(name).map(|_| ())
        })
        .await;
        let ns = format!("aigw-{name}");
        let api: Api<Token> = Api::namespaced(self.h.client.clone(), &ns);
        let mut first = None;
        for (token_name, key, models, extra) in tokens {
            let mut spec = json!({"owner": "alice", "keyHash": sha(key), "keyPrefix": &key[..7],
                                  "quota": 10_000_000, "models": models});
            for (k, v) in extra.as_object().into_iter().flatten() {
                spec[k] = v.clone();
            }
            let token: Token = serde_json::from_value(json!({
                "apiVersion": "aigateway.io/v1alpha1", "kind": "Token",
                "metadata": {"name": token_name, "namespace": ns, "labels": {labels::INSTANCE: self.h.instance}},
                "spec": spec}))
            .unwrap();
            api.create(&PostParams::default(), &token).await.unwrap();
            let id = eventually(&format!("token {token_name} mirrored"), || async {
                api.get(token_name).await.unwrap().status?.token_id
            })
            .await;
            first.get_or_insert(id);
            let hash = sha(key);
            eventually(&format!("authz knows token {token_name}"), || async {
                self.index.token(&hash).map(|_| ())
            })
            .await;
        }
        (t.status.unwrap().tenant_id.unwrap(), first.unwrap())
    }

    /// The Higress objects as the operator wrote them, read back from the kube-apiserver.
    pub async fn read_back(&self) -> Objects {
        objects::read(&self.h.client, &self.h.hns).await.unwrap()
    }

    /// Waits until the operator's route Ingresses name every model of `models`, then builds the
    /// gateway from what it wrote, counting every wasm instruction (each test of a binary uses the
    /// one fuel-counting engine, so each big module compiles once per binary).
    pub async fn gateway(&self, models: &[&str]) -> Arc<Mutex<Gateway>> {
        eventually("the operator routes every model", || async {
            let text = serde_json::to_string(&self.read_back().await.ingresses).unwrap();
            models.iter().all(|m| text.contains(m)).then_some(())
        })
        .await;
        let o = self.read_back().await;
        let provider = self.provider.addr;
        let (authz, ingest) = (self.authz, self.ingest);
        let gw = tokio::task::spawn_blocking(move || {
            let modules = |name: &str| match name {
                "aigw-plugin" => plugins::reporter(),
                other => plugins::higress(other),
            };
            let mut gw = Gateway::metered(
                &o.plugins,
                &o.ingresses,
                &o.bridge,
                &modules,
                provider,
                true,
            )
            .unwrap()
            .with_envoy_filters(&o.envoy_filters)
            .unwrap();
            gw.services.insert(
                "outbound|8081||aigw-apiserver.aigw-system.svc.cluster.local".into(),
                authz,
            );
            gw.services.insert(
                "outbound|8090||aigw-ingest.aigw-system.svc.cluster.local".into(),
                ingest,
            );
            gw
        })
        .await
        .unwrap();
        Arc::new(Mutex::new(gw))
    }

    pub async fn finish(mut self) {
        let tenants: Api<Tenant> = Api::all(self.h.client.clone());
        for t in &self.tenants {
            let _ = tenants.delete(t, &DeleteParams::default()).await;
        }
        self.h.finish().await;
        let secrets: Api<Secret> = Api::namespaced(self.h.client.clone(), "aigw-system");
        for s in &self.secrets {
            let _ = secrets.delete(s, &DeleteParams::default()).await;
        }
        if let Ok(mut c) = self.redis.get_connection() {
            let _: redis::RedisResult<()> = redis::cmd("DEL")
                .arg(&self.pending.set)
                .arg(&self.pending.events)
                .arg(&self.pending.grants)
                .query(&mut c);
        }
        let tb = Testbed::load().unwrap();
        let admin: rdkafka::admin::AdminClient<_> = ClientConfig::new()
            .set("bootstrap.servers", tb.kafka_brokers().unwrap())
            .create()
            .unwrap();
        let dlq = format!("{}-dlq", self.topic);
        let _ = admin
            .delete_topics(
                &[&self.topic, &dlq],
                &rdkafka::admin::AdminOptions::default(),
            )
            .await;
        self.shutdown.trigger();
        if let Some(op) = self.operator.take() {
            op.await.unwrap();
        }
    }
}

/// Sends `req` through the gateway (the plugins run synchronously; the servers on the runtime).
pub async fn send(gw: &Arc<Mutex<Gateway>>, req: Request) -> Response {
    let gw = gw.clone();
    tokio::task::spawn_blocking(move || {
        let mut gw = gw.lock().unwrap();
        let r = gw.handle(&req).unwrap();
        // The reporter sends from its outbox on its timer.
        gw.tick(250).unwrap();
        r
    })
    .await
    .unwrap()
}

/// Runs the plugins' timers over `ms` of their clock (200 ms ticks): e.g. the reporter's
/// outbox, which holds a failed answer's report for a few seconds.
pub async fn advance(gw: &Arc<Mutex<Gateway>>, ms: u64) {
    let gw = gw.clone();
    tokio::task::spawn_blocking(move || {
        let mut gw = gw.lock().unwrap();
        for _ in 0..ms.div_ceil(200) {
            gw.tick(200).unwrap();
        }
    })
    .await
    .unwrap();
}

/// Every plugin's log lines, for a failure message.
pub fn logs(gw: &Arc<Mutex<Gateway>>) -> String {
    let mut gw = gw.lock().unwrap();
    let mut out = String::new();
    for f in &mut gw.filters {
        for (level, line) in &f.host.state().logs {
            let _ = writeln!(out, "{} [{level}] {line}", f.name);
        }
    }
    out
}

pub fn chat(domain: &str, key: &str, body: &Value) -> Request {
    Request {
        method: "POST".into(),
        authority: domain.to_owned(),
        path: "/v1/chat/completions".into(),
        headers: vec![
            ("authorization".into(), format!("Bearer {key}")),
            ("content-type".into(), "application/json".into()),
        ],
        body: body.to_string().into_bytes(),
    }
}

/// The usage events on `topic` (waits up to `secs` for `n` of them).
pub async fn events(topic: &str, n: usize, secs: u64) -> Vec<UsageEvent> {
    let tb = Testbed::load().unwrap();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", tb.kafka_brokers().unwrap())
        .set("group.id", format!("{topic}-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while out.len() < n && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
            out.push(serde_json::from_slice(m.payload().unwrap_or_default()).unwrap());
        }
    }
    out
}

/// An OpenAI chat stream of `n` content events, then the usage chunk and `[DONE]`.
pub fn stream_body(n: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..n {
        let _ = write!(
            out,
            "data: {{\"id\":\"chatcmpl-b\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{i} \"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
        );
    }
    out.push_str("data: {\"id\":\"chatcmpl-b\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":200,\"total_tokens\":212}}\n\ndata: [DONE]\n\n");
    out.into_bytes()
}

/// The two request shapes the data plane's cost is measured on: a non-streamed chat completion
/// (the provider stand-in's recorded OpenAI body) and a 200-event stream.
pub const SHAPES: [(&str, bool); 2] = [("non-streamed", false), ("200-event stream", true)];

/// Wasm instructions per request allowed to each plugin, `[non-streamed, 200-event stream]`: about
/// 10 % above what was measured (docs/benchmarks.md, "The data plane's added cost"). The counts
/// are exact for a given request, but the request differs with the process: run alone, this
/// measured 1,776,849 / 4,272,996 in all; in the whole test binary 1,828,584 / 4,333,469 (the
/// credential strip +14 %), where another test has installed a tracer, so authz answers with a
/// `traceparent` that ext-auth copies onto the request for the later plugins to read. The budgets
/// are over the higher counts.
pub const INSTRUCTION_BUDGETS: [(&str, [u64; 2]); 6] = [
    ("aigw-ai-proxy", [855_000, 973_000]),
    ("aigw-credential-strip", [27_100, 44_500]),
    ("aigw-ext-auth", [826_000, 885_000]),
    ("aigw-header-scrub", [21_500, 38_500]),
    ("aigw-model-router", [150_000, 198_000]),
    ("aigw-usage-reporter", [133_000, 2_629_000]),
];

/// Wasm instructions per request allowed to all plugins together, `[non-streamed, stream]`: about
/// 5 % above what was measured (1,828,584 and 4,333,469 on 2026-12-01, with a tracer).
pub const TOTAL_INSTRUCTION_BUDGETS: [u64; 2] = [1_920_000, 4_550_000];

/// Wasm instructions each plugin of `gw` executes for one chat completion of shape `stream` to
/// `domain` with `key`: the median of `n` requests after 3 warm-up ones (first-use allocations and
/// caches), by plugin name. A request's count includes its share of the reporter's timer tick.
pub async fn fuel_per_request(
    bed: &Bed,
    gw: &Arc<Mutex<Gateway>>,
    domain: &str,
    key: &str,
    stream: bool,
    n: usize,
) -> BTreeMap<String, u64> {
    let fuel = || {
        gw.lock()
            .unwrap()
            .filters
            .iter()
            .map(|f| (f.name.clone(), f.host.fuel_used()))
            .collect::<BTreeMap<String, u64>>()
    };
    let body = json!({"model": "gpt-4o", "stream": stream, "max_tokens": 200,
                      "messages": [{"role": "user", "content": "Say hello in one word."}]});
    let mut per: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for i in 0..n + 3 {
        if stream {
            bed.provider.script(aigw_standin::provider::Scripted {
                status: 200,
                content_type: "text/event-stream".into(),
                body: stream_body(200),
            });
        }
        let before = fuel();
        let r = send(gw, chat(domain, key, &body)).await;
        assert_eq!(r.status, 200, "{}", r.details);
        let after = fuel();
        if i < 3 {
            continue;
        }
        for (name, a) in &after {
            per.entry(name.clone())
                .or_default()
                .push(a - before.get(name).copied().unwrap_or_default());
        }
    }
    per.into_iter()
        .map(|(name, mut v)| {
            v.sort_unstable();
            (name, v[v.len() / 2])
        })
        .collect()
}
