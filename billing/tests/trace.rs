//! One request, one trace: authz, ingest and the worker, each its own process exporting spans over
//! OTLP/HTTP to a receiver in this test, continue the W3C trace the request arrived with. authz
//! answers with its span's `traceparent` (what Higress's ext-auth copies onto the request — its
//! `allowed_upstream_headers`, checked in the operator's config snapshot); the reporter carries it in
//! the usage event (done here as the plugin does, `plugin/src/lib.rs`); ingest's span is authz's
//! child, the worker's `bill` span ingest's, and the billed row's `trace_id` is the trace's id.
//! No operator runs: the Tenant and Token CRs get the statuses it would write.

// Test code: a failed unwrap is a failed test with its message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]

mod common;

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use aigw_crds::{Tenant, Token, labels, token::hash_api_key};
use aigw_plugin_core::{TokenUsage, headers};
use aigw_testkit::{
    process::{Service, free_addr, http_send},
    unique_name,
};
use axum::{Router, body::Bytes, routing::post};
use common::{Bed, SECRET, event, start_ingest_with};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use serde_json::json;

/// A span as the receiver got it: service, name, trace id, span id, parent span id (hex).
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: String,
    span: String,
    parent: String,
    attributes: Vec<(String, String)>,
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter().fold(String::new(), |mut out, x| {
        let _ = write!(out, "{x:02x}");
        out
    })
}

/// An OTLP/HTTP trace receiver (protobuf bodies on `/v1/traces`).
async fn receiver() -> (std::net::SocketAddr, Arc<Mutex<Vec<Got>>>) {
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let sink = got.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            sink.lock().unwrap().push(Got {
                                service: service.clone(),
                                name: s.name.clone(),
                                trace: hex(&s.trace_id),
                                span: hex(&s.span_id),
                                parent: hex(&s.parent_span_id),
                                attributes: s
                                    .attributes
                                    .iter()
                                    .map(|a| (a.key.clone(), format!("{:?}", a.value)))
                                    .collect(),
                            });
                        }
                    }
                }
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, got)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_request_is_one_trace_from_authz_to_the_billed_row() {
    let bed = Bed::new("trace").await;
    let (otlp, spans) = receiver().await;
    let endpoint = format!("http://{otlp}");
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];

    // The key of the mirror's token 11 (tenant 1), as authz and billing both see it.
    let key = aigw_crds::token::generate_api_key();
    let hash = hash_api_key(&key);
    sqlx::query("UPDATE tokens SET key_hash = ? WHERE id = 11")
        .bind(&hash)
        .execute(&bed.db)
        .await
        .unwrap();
    let client = bed.tb.kube_client().await.unwrap();
    aigw_crds::install(&client, "aigw-test").await.unwrap();
    let instance = unique_name("trace");
    let tenant = unique_name("trace");
    let domain = format!("api.{tenant}.example");
    let tenants: Api<Tenant> = Api::all(client.clone());
    let tenant_cr: Tenant = serde_json::from_value(
        json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
        "metadata": {"name": tenant, "labels": {labels::INSTANCE: instance}},
        "spec": {"type": "reseller", "displayName": tenant, "domains": [domain]}}),
    )
    .unwrap();
    tenants
        .create(&PostParams::default(), &tenant_cr)
        .await
        .unwrap();
    tenants
        .patch_status(
            &tenant,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"tenantId": 1, "domains": [domain]}})),
        )
        .await
        .unwrap();
    let ns = format!("aigw-{tenant}");
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let tokens: Api<Token> = Api::namespaced(client.clone(), &ns);
    let tok: Token = serde_json::from_value(
        json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Token",
        "metadata": {"name": "tok-11", "labels": {labels::INSTANCE: instance}},
        "spec": {"owner": "alice", "keyHash": hash, "keyPrefix": &key[..7]}}),
    )
    .unwrap();
    tokens.create(&PostParams::default(), &tok).await.unwrap();
    tokens
        .patch_status(
            "tok-11",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"tokenId": 11, "phase": "Active", "keyHash": hash}})),
        )
        .await
        .unwrap();

    // The three services, each exporting to the receiver.
    let authz_addr = free_addr().unwrap();
    let authz_listen = authz_addr.to_string();
    let apiserver = env!("CARGO_BIN_EXE_aigw-billing").replace("aigw-billing", "aigw-apiserver");
    assert!(
        Path::new(&apiserver).exists(),
        "{apiserver} missing: cargo build -p aigw-apiserver"
    );
    let mut envs = bed.tb.vars();
    envs.extend([
        ("AIGW_ROLE", "authz"),
        ("AIGW_AUTHZ_ADDR", authz_listen.as_str()),
        ("AIGW_INSTANCE", instance.as_str()),
        ("AIGW_PENDING_KEY", bed.pending_key.as_str()),
        ("OTEL_SERVICE_NAME", "authz"),
    ]);
    envs.extend(otel);
    let authz = Service::start(Path::new(&apiserver), &[], &envs).unwrap();
    authz.wait_for_status("/readyz", 200, 60).unwrap();
    let (ingest, ingest_addr) = start_ingest_with(&bed, None, &otel);
    let worker = bed.start_worker_with(100, &otel);

    // The client's trace: authz continues it and answers with its own span's context.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_tp = format!("00-{client_trace}-00f067aa0ba902b7-01");
    let auth = format!("Bearer {key}");
    let body = json!({"model": "gpt-4o", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
    let answer = http_send(
        authz_addr,
        "POST",
        "/authz",
        &[
            ("x-forwarded-host", domain.as_str()),
            ("x-forwarded-uri", "/v1/chat/completions"),
            ("x-forwarded-method", "POST"),
            ("content-type", "application/json"),
            ("authorization", auth.as_str()),
            (headers::TRACEPARENT, client_tp.as_str()),
        ],
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    let authz_tp = answer.header(headers::TRACEPARENT).unwrap().to_owned();
    assert!(
        authz_tp.starts_with(&format!("00-{client_trace}-")),
        "{authz_tp}"
    );
    assert_ne!(authz_tp, client_tp, "authz's own span, not the client's");

    // The reporter's event, with what ext-auth put on the request.
    let mut ev = event(
        "traced",
        "1",
        11,
        "gpt-4o",
        TokenUsage {
            prompt_tokens: Some(12),
            completion_tokens: Some(3),
            ..TokenUsage::default()
        },
    );
    ev.event_id = answer.header(headers::EVENT_ID).unwrap().to_owned();
    ev.reservation = answer.header(headers::RESERVATION).unwrap().to_owned();
    ev.trace_parent = Some(authz_tp.clone());
    let payload = serde_json::to_vec(&ev).unwrap();
    let (status, accepted) = common::post(ingest_addr, Some(SECRET), &payload);
    assert_eq!(status, 202, "{accepted}");
    bed.drained(60).await;

    // Shut down (each flushes its spans), then read what arrived.
    for svc in [authz, ingest, worker] {
        assert!(svc.terminate(15).unwrap().success());
    }
    let got = spans.lock().unwrap().clone();
    let one = |name: &str| -> Got {
        let of: Vec<&Got> = got.iter().filter(|g| g.name == name).collect();
        assert_eq!(of.len(), 1, "one {name} span: {got:?}");
        of[0].clone()
    };
    let (authz_span, ingest_span, bill_span) = (one("authz"), one("ingest"), one("bill"));
    for span in [&authz_span, &ingest_span, &bill_span] {
        assert_eq!(span.trace, client_trace, "{span:?}");
    }
    assert_eq!(
        authz_span.parent, "00f067aa0ba902b7",
        "authz continues the client's span"
    );
    assert_eq!(
        authz_tp,
        format!("00-{client_trace}-{}-01", authz_span.span)
    );
    assert_eq!(
        ingest_span.parent, authz_span.span,
        "ingest is authz's child"
    );
    assert_eq!(
        bill_span.parent, ingest_span.span,
        "the worker's span is ingest's child"
    );
    assert!(
        authz_span.service.contains("authz") && ingest_span.service.contains("aigw-billing"),
        "{authz_span:?} {ingest_span:?}"
    );
    assert!(
        bill_span
            .attributes
            .iter()
            .any(|(k, v)| k == "tenant_id" && v.contains("\"1\"")),
        "{bill_span:?}"
    );

    // The billed row carries the trace id.
    let rows: Vec<String> = bed
        .ch
        .query("SELECT trace_id FROM usage_logs WHERE event_id = ?")
        .bind(&ev.event_id)
        .fetch_all::<String>()
        .await
        .unwrap();
    assert_eq!(rows, vec![client_trace.to_owned()]);

    // authz's pending record of the admitted request (this test's own key).
    aigw_testkit::delete_redis_prefix(&bed.tb.redis().unwrap(), &bed.pending_key)
        .await
        .unwrap();
    tenants
        .delete(&tenant, &DeleteParams::default())
        .await
        .unwrap();
    Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
}
