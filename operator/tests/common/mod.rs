//! The operator test harness shared by the test binaries: an isolated run (instance label, Higress
//! namespace, MySQL database, name suffix), the examples renamed for it, and polling helpers.

// Each test binary uses a part of the harness.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{future::Future, sync::Arc, time::Duration};

use aigw_common::shutdown::Shutdown;
use aigw_crds::{Channel, Pricing, Tenant, Token, labels};
use aigw_operator::{
    context::{Config, Ctx, Metrics},
    higress,
    keys::Sealer,
};
use aigw_testkit::{Testbed, unique_name};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use rdkafka::producer::FutureProducer;
use serde_json::{Value, json};
use sqlx::MySqlPool;

pub const TIMEOUT: Duration = Duration::from_mins(1);

/// Polls `check` until it returns `Some`, or panics with `what` after [`TIMEOUT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub struct Harness {
    pub client: Client,
    pub db: MySqlPool,
    pub sfx: String,
    pub instance: String,
    pub hns: String,
    pub key_hex: String,
}

impl Harness {
    pub async fn new() -> Self {
        let tb = Testbed::load().unwrap();
        let client = tb.kube_client().await.unwrap();
        aigw_crds::install(&client, "aigw-test").await.unwrap();
        let (_, db) = tb.scratch_mysql("operator").await.unwrap();
        aigw_migrations::run_mysql(&db).await.unwrap();
        let sfx = unique_name("x").trim_start_matches("x-").to_owned();
        let hns = format!("hi-{sfx}");
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": hns}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        Self {
            client,
            db,
            instance: format!("test-{sfx}"),
            sfx,
            hns,
            key_hex: "42".repeat(32),
        }
    }

    pub fn ctx_with(&self, events: Option<FutureProducer>) -> Arc<Ctx> {
        self.ctx_configured(events, |_| {})
    }

    /// A context whose configuration `edit` adjusts (after the run's instance and namespace).
    pub fn ctx_configured(
        &self,
        events: Option<FutureProducer>,
        edit: impl FnOnce(&mut Config),
    ) -> Arc<Ctx> {
        let mut config = Config {
            instance: Some(self.instance.clone()),
            ..Config::with_defaults(&self.hns)
        };
        edit(&mut config);
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        Arc::new(Ctx::new(
            self.client.clone(),
            self.db.clone(),
            config,
            metrics,
            Sealer::from_hex(&self.key_hex).unwrap(),
            events,
        ))
    }

    pub fn start(&self) -> (Arc<Ctx>, Shutdown, tokio::task::JoinHandle<()>) {
        self.start_with(None)
    }

    pub fn start_with(
        &self,
        events: Option<FutureProducer>,
    ) -> (Arc<Ctx>, Shutdown, tokio::task::JoinHandle<()>) {
        let ctx = self.ctx_with(events);
        let shutdown = Shutdown::new();
        let task = tokio::spawn(aigw_operator::run(ctx.clone(), shutdown.clone()));
        (ctx, shutdown, task)
    }

    /// Deletes what the run made that is not deleted with its tenants: its Channels (while its
    /// operator still runs, which removes their finalizers) and its Higress namespace.
    pub async fn finish(&self) {
        let channels: Api<Channel> = Api::all(self.client.clone());
        let mine = kube::api::ListParams::default().labels(&format!(
            "{}={}",
            labels::INSTANCE,
            self.instance
        ));
        for c in channels.list(&mine).await.unwrap() {
            let name = c.metadata.name.unwrap_or_default();
            let _ = channels
                .delete(&name, &kube::api::DeleteParams::default())
                .await;
        }
        eventually("the run's channels deleted", || async {
            channels
                .list(&mine)
                .await
                .unwrap()
                .items
                .is_empty()
                .then_some(())
        })
        .await;
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.hns, &kube::api::DeleteParams::default())
            .await;
    }

    /// Starts an operator with a configuration `edit` adjusts.
    pub fn start_configured(
        &self,
        edit: impl FnOnce(&mut Config),
    ) -> (Arc<Ctx>, Shutdown, tokio::task::JoinHandle<()>) {
        let ctx = self.ctx_configured(None, edit);
        let shutdown = Shutdown::new();
        let task = tokio::spawn(aigw_operator::run(ctx.clone(), shutdown.clone()));
        (ctx, shutdown, task)
    }

    pub fn rename(&self, name: &str) -> String {
        match name {
            "aigw-system" => name.to_owned(),
            n if n.starts_with("aigw-") => format!("{n}-{}", self.sfx),
            n => format!("{n}-{}", self.sfx),
        }
    }

    /// The example documents of `file`, renamed for this run and labelled with its instance.
    pub fn example(&self, file: &str) -> Vec<Value> {
        let path = format!("{}/../examples/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        serde_yaml::Deserializer::from_str(&text)
            .map(|doc| {
                let mut v: Value =
                    serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
                let name = v["metadata"]["name"].as_str().unwrap().to_owned();
                v["metadata"]["name"] = json!(self.rename(&name));
                if let Some(ns) = v["metadata"]["namespace"].as_str().map(str::to_owned) {
                    v["metadata"]["namespace"] = json!(self.rename(&ns));
                }
                if let Some(secret) = v["spec"]["credentials"]["name"].as_str().map(str::to_owned) {
                    v["spec"]["credentials"]["name"] = json!(self.rename(&secret));
                }
                if v["apiVersion"]
                    .as_str()
                    .unwrap()
                    .starts_with("aigateway.io/")
                {
                    v["metadata"]["labels"] = json!({labels::INSTANCE: self.instance});
                }
                v
            })
            .collect()
    }

    pub async fn apply_docs(&self, docs: &[Value]) {
        for doc in docs {
            let kind = doc["kind"].as_str().unwrap();
            let ar = match kind {
                "Namespace" => ApiResource::erase::<Namespace>(&()),
                "Secret" => ApiResource::erase::<Secret>(&()),
                "Tenant" => ApiResource::erase::<Tenant>(&()),
                "Channel" => ApiResource::erase::<Channel>(&()),
                "Pricing" => ApiResource::erase::<Pricing>(&()),
                "Token" => ApiResource::erase::<Token>(&()),
                other => panic!("unexpected kind {other} in examples"),
            };
            let api: Api<DynamicObject> = match doc["metadata"]["namespace"].as_str() {
                Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
                None => Api::all_with(self.client.clone(), &ar),
            };
            api.patch(
                doc["metadata"]["name"].as_str().unwrap(),
                &PatchParams::apply("aigw-test").force(),
                &Patch::Apply(doc),
            )
            .await
            .unwrap_or_else(|e| panic!("applying {kind}: {e}"));
        }
    }

    pub async fn ready<K>(&self, api: &Api<K>, name: &str) -> K
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
    {
        eventually(&format!("{name} Ready"), || async {
            let obj = api.get_opt(name).await.unwrap()?;
            let v = serde_json::to_value(&obj).unwrap();
            let ready = v["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            ready.then_some(obj)
        })
        .await
    }

    pub fn bridge_api(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            &self.hns,
            &higress::mcp_bridge_resource(),
        )
    }

    pub async fn registries(&self) -> Vec<String> {
        match self.bridge_api().get_opt("default").await.unwrap() {
            Some(b) => b.data["spec"]["registries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["name"].as_str().unwrap().to_owned())
                .collect(),
            None => vec![],
        }
    }
}

/// Waits until the operator has made no write for `quiet`, then returns its write count.
pub async fn settled(ctx: &Ctx, quiet: Duration) -> u64 {
    let mut last = ctx.writes();
    loop {
        tokio::time::sleep(quiet).await;
        let now = ctx.writes();
        if now == last {
            return now;
        }
        last = now;
    }
}

use serde::Deserialize;
