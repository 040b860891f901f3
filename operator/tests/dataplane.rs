//! The data plane, proven with Higress's own plugins: the operator writes its Higress objects;
//! the stand-in (`aigw_standin`, test tooling standing in for Envoy, which cannot run here) reads
//! them back from the kube-apiserver, loads the plugins they name — Higress's real `ext-auth`,
//! `model-router` and `ai-proxy` builds and our reporter — configured as Higress's controller
//! delivers them, routes as Higress translates the Ingresses, calls the real authz and ingest, and
//! forwards upstream to the provider stand-in (recorded provider bodies; providers cannot run
//! here). Each test goes from a client request to what the provider saw, what the client got and
//! the usage event in Kafka.

// Test code: a failed unwrap is a failed test with its message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]

mod common;
mod dataplane_bed;

use aigw_common::quota::{TokenKeys, seen_key};
use aigw_crds::Channel;
use aigw_operator::higress;
use aigw_standin::{
    envoy_check,
    gateway::{Request, Response},
    provider::{Provider, Received, Scripted, load_recording},
};
use common::eventually;
use dataplane_bed::{
    Bed, INGEST_SECRET, INSTRUCTION_BUDGETS, PROVIDER_KEY, SHAPES, TOTAL_INSTRUCTION_BUDGETS,
    advance, chat, events, fuel_per_request, logs, send, sha,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, api::PostParams};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_completion_flows_key_to_route_to_provider_to_usage() {
    let Some(mut bed) =
        Bed::for_test("a_chat_completion_flows_key_to_route_to_provider_to_usage").await
    else {
        return;
    };
    // A tracer in this process (nothing exported): the in-process authz answers with its own
    // span's context, so the event carries authz's value only if ext-auth copied it over the
    // client's header.
    {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        tracing_subscriber::registry()
            .with(tracing_subscriber::filter::LevelFilter::INFO)
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("dataplane-test")))
            .try_init()
            .unwrap();
    }
    let sfx = bed.h.sfx.clone();
    bed.channel(
        &format!("oai-{sfx}"),
        json!({"provider": "openai", "models": ["gpt-4o"]}),
    )
    .await;
    let tenant = format!("dp-{sfx}");
    let domain = format!("api.{tenant}.example");
    let key = format!("sk-client-{sfx}");
    let (tenant_id, token_id) = bed.tenant(&tenant, &domain, &key, &["gpt-4o"]).await;
    let gw = bed.gateway(&["gpt-4o"]).await;
    for f in &mut gw.lock().unwrap().filters {
        assert!(
            f.host.configured,
            "{} refused the configuration Higress delivers: {:?}",
            f.name,
            f.host.state().logs
        );
    }

    // Not streamed. The client also sends Envoy's own headers (which Envoy obeys from peers it
    // takes for internal: retries of a served answer, the path a fallback restores): dropped.
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let mut req = chat(&domain, &key, &body);
    for (k, v) in [
        ("x-envoy-retry-on", "retriable-status-codes"),
        ("x-envoy-retriable-status-codes", "200"),
        ("x-envoy-max-retries", "10"),
        ("x-envoy-original-path", "/api/v1/tenants"),
        // The client's W3C trace context: authz continues it and answers with its own span's,
        // ext-auth copies that onto the request, the reporter puts it in the usage event.
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ] {
        req.headers.push((k.into(), v.into()));
    }
    let r = send(&gw, req).await;
    let (recorded, meta) = load_recording("openai-chat-nonstream-cached").unwrap();
    assert_eq!(
        r.status,
        200,
        "{} {}\n{}",
        r.details,
        String::from_utf8_lossy(&r.body),
        logs(&gw)
    );
    let got: Value = serde_json::from_slice(&r.body).unwrap();
    let want: Value = serde_json::from_slice(&recorded).unwrap();
    assert_eq!(
        got["usage"], want["usage"],
        "the client gets the provider's answer"
    );
    let seen = bed.provider.received();
    assert_eq!(seen.len(), 1);
    let up = &seen[0];
    assert_eq!(up.uri, "/v1/chat/completions");
    assert_eq!(up.header("host"), Some("api.openai.com"));
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );
    let leaked: Vec<&(String, String)> = up
        .headers
        .iter()
        .filter(|(k, v)| {
            k.starts_with("x-aigw-")
                || k == "x-mse-consumer"
                || k == "x-hi-original-auth"
                || v.contains(&key)
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "reached the provider: {leaked:?} (all: {:?})",
        up.headers
    );
    let sent: Value = serde_json::from_slice(&up.body).unwrap();
    assert_eq!(sent["model"], "gpt-4o");
    let envoy: Vec<&(String, String)> = up
        .headers
        .iter()
        .filter(|(k, _)| {
            k.starts_with("x-envoy-retr")
                || k == "x-envoy-max-retries"
                || k == "x-envoy-original-path"
        })
        .collect();
    assert!(
        envoy.is_empty(),
        "client-sent Envoy headers survived: {envoy:?}"
    );

    let evs = events(&bed.topic, 1, 30).await;
    assert_eq!(evs.len(), 1, "one usage event: {evs:?}\n{}", logs(&gw));
    let ev = &evs[0];
    assert_eq!(ev.tenant, tenant_id.to_string(), "{ev:?}");
    assert_eq!(ev.token, token_id.to_string(), "{ev:?}");
    assert_eq!(ev.model, "gpt-4o", "{ev:?}");
    let tp = ev.trace_parent.as_deref().unwrap_or_default();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
            && tp != "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "the event carries authz's span in the client's trace: {ev:?}"
    );
    let expected = &meta["expected"];
    assert_eq!(
        (ev.usage.prompt_tokens, ev.usage.completion_tokens),
        (
            expected["prompt_tokens"].as_u64(),
            expected["completion_tokens"].as_u64()
        ),
        "{ev:?}"
    );

    // Streamed: the same path, chunk by chunk; one more event with the stream's usage.
    let body = json!({"model": "gpt-4o", "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let r = send(&gw, chat(&domain, &key, &body)).await;
    assert_eq!(r.status, 200, "{} {}", r.details, logs(&gw));
    let (recorded, meta) = load_recording("openai-chat-stream-include-usage").unwrap();
    assert!(r.chunks.len() > 1, "streamed in chunks");
    assert_eq!(r.body, recorded, "the client gets the provider's stream");
    let evs = events(&bed.topic, 2, 30).await;
    assert_eq!(evs.len(), 2, "{evs:?}");
    let expected = &meta["expected"];
    assert_eq!(
        (evs[1].usage.prompt_tokens, evs[1].usage.completion_tokens),
        (
            expected["prompt_tokens"].as_u64(),
            expected["completion_tokens"].as_u64()
        ),
        "{:?}",
        evs[1]
    );
    assert_ne!(evs[0].event_id, evs[1].event_id);

    // The provider dies mid-stream, before the chunk with the usage: the client gets what had
    // arrived and a reset; the report says truncated, and billing charges the admission estimate
    // for what is missing — never 0.
    bed.provider.cut_next(600);
    let r = send(&gw, chat(&domain, &key, &body)).await;
    assert!(
        r.reset,
        "the stream was cut: {} {}",
        r.details,
        r.body.len()
    );
    assert!(
        !r.body.is_empty() && r.body.len() <= 600,
        "{}",
        r.body.len()
    );
    let evs = events(&bed.topic, 3, 30).await;
    assert_eq!(evs.len(), 3, "{evs:?}");
    let cut = &evs[2];
    assert_eq!(cut.outcome, aigw_plugin_core::Outcome::Truncated, "{cut:?}");
    let charged = aigw_billing::worker::charged_usage(cut)
        .unwrap()
        .expect("a cut stream is charged");
    let estimate = cut.estimate.clone().unwrap();
    assert_eq!(
        charged.completion_tokens, estimate.completion_tokens,
        "{cut:?}"
    );
    assert!(charged.prompt_tokens.unwrap_or(0) > 0, "{charged:?}");

    bed.finish().await;
}

/// Asserts that `r` was refused by the gateway and the provider saw nothing new.
fn refused(what: &str, r: &Response, provider: &Provider, before: usize) {
    assert!(
        (400..500).contains(&r.status) && r.details != "via_upstream",
        "{what}: {} {} {}",
        r.status,
        r.details,
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        provider.received().len(),
        before,
        "{what}: the provider saw the request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_never_reach_the_provider() {
    let Some(mut bed) = Bed::for_test("refused_requests_never_reach_the_provider").await else {
        return;
    };
    let sfx = bed.h.sfx.clone();
    bed.channel(
        &format!("oai-{sfx}"),
        json!({"provider": "openai", "models": ["gpt-4o", "gpt-4o-mini"]}),
    )
    .await;
    let (a, b) = (format!("ra-{sfx}"), format!("rb-{sfx}"));
    let (dom_a, dom_b) = (format!("api.{a}.example"), format!("api.{b}.example"));
    let (key_a, key_off, key_old, key_b) = (
        format!("sk-a-{sfx}"),
        format!("sk-off-{sfx}"),
        format!("sk-old-{sfx}"),
        format!("sk-b-{sfx}"),
    );
    bed.tenant_with(
        &a,
        &dom_a,
        &[
            ("main", &key_a, &["gpt-4o"], json!({})),
            ("off", &key_off, &["gpt-4o"], json!({"disabled": true})),
            (
                "old",
                &key_old,
                &["gpt-4o"],
                json!({"expiresAt": "2020-01-01T00:00:00Z"}),
            ),
        ],
    )
    .await;
    bed.tenant(&b, &dom_b, &key_b, &[]).await;
    let gw = bed.gateway(&["gpt-4o", "gpt-4o-mini"]).await;
    let p = bed.provider.clone();
    let gpt4o = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let mini = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});

    let cases: Vec<(&str, Request)> = vec![
        ("A's key on B's domain", chat(&dom_b, &key_a, &gpt4o)),
        (
            "A's key on an unknown domain",
            chat("api.nobody.example", &key_a, &gpt4o),
        ),
        ("an unknown key", chat(&dom_a, "sk-unknown-key-000", &gpt4o)),
        ("no key", {
            let mut r = chat(&dom_a, "x", &gpt4o);
            r.headers.retain(|(k, _)| k != "authorization");
            r
        }),
        ("a disabled token", chat(&dom_a, &key_off, &gpt4o)),
        ("an expired token", chat(&dom_a, &key_old, &gpt4o)),
        (
            "a model outside the allow-list",
            chat(&dom_a, &key_a, &mini),
        ),
        ("a spoofed model header (body asks another model)", {
            let mut r = chat(&dom_a, &key_a, &mini);
            r.headers
                .push(("x-higress-llm-model".into(), "gpt-4o".into()));
            r
        }),
        ("a spoofed model header on a non-JSON body", {
            let mut r = chat(&dom_a, &key_a, &mini);
            r.headers = vec![
                ("authorization".into(), format!("Bearer {key_a}")),
                ("content-type".into(), "text/plain".into()),
                ("x-higress-llm-model".into(), "gpt-4o".into()),
            ];
            r
        }),
        ("a spoofed model header, no model in the body", {
            let mut r = chat(&dom_a, &key_a, &json!({"messages": []}));
            r.headers
                .push(("x-higress-llm-model".into(), "gpt-4o".into()));
            r
        }),
        ("an unmetered endpoint", {
            let mut r = chat(&dom_a, &key_a, &json!({"model": "gpt-4o", "prompt": "x"}));
            r.path = "/v1/images/generations".into();
            r
        }),
        (
            "a stream without usage",
            chat(
                &dom_a,
                &key_a,
                &json!({"model": "gpt-4o", "stream": true,
            "stream_options": {"include_usage": false}, "messages": []}),
            ),
        ),
        ("the internal ingest route", {
            let mut r = chat(&dom_a, &key_a, &gpt4o);
            r.path = "/.aigw-internal/ingest".into();
            r.headers.push((
                higress::INTERNAL_HEADER.into(),
                higress::internal_route_value(INGEST_SECRET),
            ));
            r
        }),
    ];
    for (what, req) in cases {
        let before = p.received().len();
        let r = send(&gw, req).await;
        refused(what, &r, &p, before);
    }

    // GET /v1/models: what the key may call, on its own domain only.
    let list = |domain: &str, key: &str| Request {
        method: "GET".into(),
        authority: domain.to_owned(),
        path: "/v1/models".into(),
        headers: vec![("authorization".into(), format!("Bearer {key}"))],
        body: Vec::new(),
    };
    let ids = |r: &Response| -> Vec<String> {
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let r = send(&gw, list(&dom_a, &key_a)).await;
    assert_eq!(
        r.status,
        200,
        "{} {}",
        r.details,
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(ids(&r), ["gpt-4o"], "A's allow-list");
    let r = send(&gw, list(&dom_b, &key_b)).await;
    assert_eq!(r.status, 200);
    assert_eq!(ids(&r), ["gpt-4o", "gpt-4o-mini"], "every served model");
    let mut forged = list(&dom_b, &key_a);
    forged
        .headers
        .push(("x-forwarded-host".into(), dom_a.clone()));
    for (what, req) in [
        ("models with A's key on B's domain", list(&dom_b, &key_a)),
        (
            "models on B's domain claiming A's in X-Forwarded-Host",
            forged,
        ),
        ("models with an unknown key", list(&dom_a, "sk-nope-0000")),
        ("models with a disabled token", list(&dom_a, &key_off)),
    ] {
        let r = send(&gw, req).await;
        assert!(
            [401, 403].contains(&r.status),
            "{what}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            !String::from_utf8_lossy(&r.body).contains("gpt-4o"),
            "{what}"
        );
    }

    // Served: A's key on A's domain; B's key sent as x-api-key. Neither key reaches the provider.
    let r = send(&gw, chat(&dom_a, &key_a, &gpt4o)).await;
    assert_eq!(r.status, 200, "{} {}", r.details, logs(&gw));
    let mut by_api_key = chat(&dom_b, "x", &mini);
    by_api_key.headers = vec![
        ("x-api-key".into(), key_b.clone()),
        ("content-type".into(), "application/json".into()),
    ];
    let r = send(&gw, by_api_key).await;
    assert_eq!(r.status, 200, "{} {}", r.details, logs(&gw));
    let seen = p.received();
    assert_eq!(seen.len(), 2);
    for up in &seen {
        for (k, v) in &up.headers {
            assert!(
                !v.contains(&key_a) && !v.contains(&key_b),
                "a tenant key reached the provider in {k}"
            );
        }
    }
    bed.finish().await;
}

/// The headers that must never reach a provider, found in what it received.
fn leaks<'a>(up: &'a Received, client_key: &str) -> Vec<&'a (String, String)> {
    up.headers
        .iter()
        .filter(|(k, v)| {
            k.starts_with("x-aigw-")
                || k == "x-mse-consumer"
                || k == "x-hi-original-auth"
                || v.contains(client_key)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_top_tier_falls_back_with_the_same_body_and_is_billed_once() {
    let Some(mut bed) =
        Bed::for_test("a_failing_top_tier_falls_back_with_the_same_body_and_is_billed_once").await
    else {
        return;
    };
    let sfx = bed.h.sfx.clone();
    let (key_top, key_low) = ("sk-provider-top-tier-key", "sk-provider-low-tier-key");
    // The top tier speaks Anthropic's protocol, the next OpenAI's: the second pass must not
    // carry the top tier's key, path or body shape.
    bed.channel_keyed(
        &format!("top-{sfx}"),
        json!({"provider": "claude", "models": ["gpt-4o"], "priority": 10, "maxRetry": 1}),
        key_top,
    )
    .await;
    bed.channel_keyed(
        &format!("low-{sfx}"),
        json!({"provider": "openai", "models": ["gpt-4o"], "priority": 1}),
        key_low,
    )
    .await;
    let (a, b) = (format!("fa-{sfx}"), format!("fb-{sfx}"));
    let (dom_a, dom_b) = (format!("api.{a}.example"), format!("api.{b}.example"));
    let (key_a, key_tiny, key_rpm1, key_b) = (
        format!("sk-a-{sfx}"),
        format!("sk-tiny-{sfx}"),
        format!("sk-slow-{sfx}"),
        format!("sk-b-{sfx}"),
    );
    let (tenant_a, _) = bed
        .tenant_with(
            &a,
            &dom_a,
            &[
                ("main", &key_a, &["gpt-4o"], json!({})),
                ("tiny", &key_tiny, &["gpt-4o"], json!({"quota": 10})),
                ("slow", &key_rpm1, &["gpt-4o"], json!({"rateLimit": 1})),
            ],
        )
        .await;
    bed.tenant(&b, &dom_b, &key_b, &["gpt-4o"]).await;
    let filters = eventually("the operator writes the fallback EnvoyFilter", || async {
        let filters = bed.read_back().await.envoy_filters;
        (!filters.is_empty()).then_some(filters)
    })
    .await;
    // Envoy's own protos accept what the operator wrote (Higress's added fields by name only, in
    // the TypedStruct the Higress console uses), and refuse a misplaced field (a redirect-policy
    // field on CustomResponse) and the redirect policy typed directly with Higress's fields
    // (parsed with upstream protos, which lack them), as the operator wrote it before.
    let mut extra_field = filters.clone();
    extra_field[0]["spec"]["configPatches"][0]["patch"]["value"]["typed_per_filter_config"]["envoy.filters.http.custom_response"]
        ["value"]["use_original_request_body"] = json!(true);
    let mut direct = filters.clone();
    for m in direct[0]["spec"]["configPatches"][0]["patch"]["value"]["typed_per_filter_config"]
        ["envoy.filters.http.custom_response"]["value"]["custom_response_matcher"]["matcher_list"]
        ["matchers"]
        .as_array_mut()
        .unwrap()
    {
        let action = &mut m["on_match"]["action"]["typed_config"];
        let mut policy = action["value"].clone();
        policy["@type"] = action["type_url"].clone();
        *action = policy;
    }
    let [now, extra_field, direct] = tokio::task::spawn_blocking(move || {
        [filters, extra_field, direct].map(|f| envoy_check::problems(&f).unwrap())
    })
    .await
    .unwrap();
    assert!(now.is_empty(), "Envoy's protos refuse: {now:?}");
    assert!(
        extra_field
            .iter()
            .any(|p| p.contains("use_original_request_body")),
        "a redirect-policy field misplaced on CustomResponse passed: {extra_field:?}"
    );
    assert!(
        direct.iter().any(|p| p.contains("unknown field")),
        "Higress's fields in a directly typed policy passed: {direct:?}"
    );
    let gw = bed.gateway(&["gpt-4o"]).await;
    assert_eq!(
        gw.lock().unwrap().custom_responses.len(),
        1,
        "one route with a fallback"
    );
    let mut redis = bed.redis.get_multiplexed_async_connection().await.unwrap();
    let recorded: Value =
        serde_json::from_slice(&load_recording("openai-chat-nonstream-cached").unwrap().0).unwrap();

    let error = br#"{"error":{"message":"overloaded","type":"server_error"}}"#.to_vec();
    let fail = |status: u16| Scripted {
        status,
        content_type: "application/json".into(),
        body: error.clone(),
    };
    let body =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "fall back, please"}]});

    // One 503: Envoy retries it on the same channel (`maxRetry` 1), which serves; no fallback.
    bed.provider.script(fail(503));
    let r = send(&gw, chat(&dom_a, &key_a, &body)).await;
    assert_eq!(r.status, 200, "{} {}", r.details, logs(&gw));
    assert_eq!(r.redirects, 0, "a retried 503 is not a fallback");
    let seen = bed.provider.received();
    assert_eq!(seen.len(), 2, "first try and one retry: {seen:?}");
    assert!(
        seen.iter()
            .all(|up| up.header("x-api-key") == Some(key_top))
    );
    let retried = events(&bed.topic, 1, 30).await;
    assert_eq!(
        retried.len(),
        1,
        "one report for the retried request: {retried:?}"
    );
    assert_eq!(retried[0].status, 200);
    let skip = seen.len();
    gw.lock().unwrap().upstreams.clear();

    // The top tier answers 503 on the try and the retry: the next tier serves the same request.
    bed.provider.script(fail(503));
    bed.provider.script(fail(503));
    let r = send(&gw, chat(&dom_a, &key_a, &body)).await;
    assert_eq!(
        r.status,
        200,
        "{} {}\n{}",
        r.details,
        String::from_utf8_lossy(&r.body),
        logs(&gw)
    );
    assert_eq!(r.redirects, 1);
    let got: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        got["usage"], recorded["usage"],
        "the fallback tier's answer"
    );
    let seen = bed.provider.received()[skip..].to_vec();
    assert_eq!(seen.len(), 3, "try, retry, then the next tier: {seen:?}");
    assert_eq!(seen[0].uri, seen[1].uri, "the retry is the same request");
    let seen = seen[1..].to_vec();
    assert!(seen[0].uri.contains("/v1/messages"), "{}", seen[0].uri);
    assert_eq!(seen[0].header("x-api-key"), Some(key_top));
    assert_eq!(
        seen[1].uri, "/v1/chat/completions",
        "the client's path, restored for the second pass"
    );
    assert_eq!(
        seen[1].header("authorization"),
        Some(format!("Bearer {key_low}").as_str()),
        "the second pass went to the next tier with its own key"
    );
    let top_key_reached: Vec<&(String, String)> = seen[1]
        .headers
        .iter()
        .filter(|(_, v)| v.contains(key_top))
        .collect();
    assert!(
        top_key_reached.is_empty(),
        "the top tier's key reached the next tier: {top_key_reached:?}"
    );
    assert!(
        String::from_utf8_lossy(&seen[0].body).contains("fall back, please"),
        "the first tier got the request"
    );
    let second: Value = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(
        second["messages"], body["messages"],
        "the client's body, not the top tier's translation"
    );
    for up in &seen {
        let leaked = leaks(up, &key_a);
        assert!(leaked.is_empty(), "reached the provider: {leaked:?}");
    }
    let clusters: Vec<String> = gw
        .lock()
        .unwrap()
        .upstreams
        .iter()
        .map(|u| u.cluster.clone())
        .collect();
    assert!(
        clusters.len() == 3
            && clusters[..2]
                .iter()
                .all(|c| c.contains(&format!("aigw-top-{sfx}")))
            && clusters[2].contains(&format!("aigw-low-{sfx}")),
        "{clusters:?}"
    );

    // Billed once: the first pass reported its 503 (no usage) and is retired — its reservation
    // released, never swept, its report marked applied so the worker drops it; the second pass
    // carries the usage and the only reservation.
    // The failed first pass's report waits in the reporter's outbox (so authz can retire the
    // first pass before the worker forgets it): only the second pass's is out at once.
    let early = events(&bed.topic, 3, 3).await;
    assert_eq!(
        early.len(),
        2,
        "the 503 report was not held back: {early:?}"
    );
    advance(&gw, 5_200).await;
    let evs = events(&bed.topic, 3, 30).await[1..].to_vec();
    assert_eq!(evs.len(), 2, "{evs:?}\n{}", logs(&gw));
    let failed = evs
        .iter()
        .find(|e| e.status == 503)
        .expect("the first pass's report");
    let served = evs
        .iter()
        .find(|e| e.status == 200)
        .expect("the second pass's report");
    assert_eq!(failed.usage.billable_tokens(), 0, "{failed:?}");
    assert_eq!(served.tenant, tenant_a.to_string());
    assert_eq!(
        served.usage.prompt_tokens,
        recorded["usage"]["prompt_tokens"].as_u64(),
        "{served:?}"
    );
    assert_ne!(failed.event_id, served.event_id);
    let marker: Option<String> = redis::cmd("GET")
        .arg(seen_key(&failed.dedupe_key()))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        marker.as_deref(),
        Some("1"),
        "the first pass is marked applied"
    );
    for (key, id, pending) in [
        (&bed.pending.events, &failed.event_id, false),
        (&bed.pending.grants, &failed.event_id, false),
        (&bed.pending.events, &served.event_id, true),
    ] {
        let exists: bool = redis::cmd("HEXISTS")
            .arg(key)
            .arg(id)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(exists, pending, "{key} {id}");
    }
    let reserved: i64 = redis::cmd("GET")
        .arg(TokenKeys::new(&sha(&key_a)).reserved)
        .query_async(&mut redis)
        .await
        .unwrap();
    let held = |e: &aigw_plugin_core::UsageEvent| -> i64 {
        e.reservation
            .rsplit_once(':')
            .and_then(|(_, n)| n.parse().ok())
            .unwrap()
    };
    // Nothing settles here (no billing worker): the retried request and the second pass hold
    // their reservations; the first pass holds none.
    assert_eq!(
        reserved,
        held(&retried[0]) + held(served),
        "only the second pass holds quota"
    );

    // 429 from the top tier is not retried (Envoy retries 5xx only) and falls back at once.
    bed.provider.script(fail(429));
    let r = send(&gw, chat(&dom_a, &key_a, &body)).await;
    assert_eq!(r.status, 200, "{} {}", r.details, logs(&gw));
    assert_eq!(r.redirects, 1);
    assert_eq!(bed.provider.received().len(), skip + 3 + 2);

    // A key allowed one request per minute: its fallback is one request (the second pass takes
    // no RPM slot), and its next request is over the limit.
    bed.provider.script(fail(429));
    let r = send(&gw, chat(&dom_a, &key_rpm1, &body)).await;
    assert_eq!(
        r.status,
        200,
        "{} {}",
        r.details,
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.redirects, 1);
    let before = bed.provider.received().len();
    let r = send(&gw, chat(&dom_a, &key_rpm1, &body)).await;
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    refused("over the RPM limit", &r, &bed.provider, before);

    // The gateway's own refusal (authz: quota) is answered as is, never tried on another tier.
    let before = bed.provider.received().len();
    let r = send(&gw, chat(&dom_a, &key_tiny, &body)).await;
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.redirects, 0, "a refusal by the gateway is not redirected");
    refused("over quota", &r, &bed.provider, before);

    // A client cannot use the fallback header: an invented grant, a real event with a guessed
    // grant, and A's real pending grant used by B on B's domain are refused; A's request stays
    // pending.
    let recorded: String = redis::cmd("HGET")
        .arg(&bed.pending.grants)
        .arg(&served.event_id)
        .query_async(&mut redis)
        .await
        .unwrap();
    let live = recorded.split(':').next().unwrap().to_owned();
    for (what, domain, key, value) in [
        ("an invented grant", &dom_a, &key_a, "0123.4567".to_owned()),
        (
            "a guessed grant",
            &dom_a,
            &key_a,
            format!("{}.{}", served.event_id, "0".repeat(32)),
        ),
        (
            "A's grant on B's domain",
            &dom_b,
            &key_b,
            format!("{}.{live}", served.event_id),
        ),
    ] {
        let before = bed.provider.received().len();
        let mut req = chat(domain, key, &body);
        req.headers.push(("x-aigw-fallback".into(), value));
        let r = send(&gw, req).await;
        refused(what, &r, &bed.provider, before);
    }
    let exists: bool = redis::cmd("HEXISTS")
        .arg(&bed.pending.events)
        .arg(&served.event_id)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(exists, "A's pending request survives B's attempt");
    // One report for the retried request, exactly two per fallback (three fallbacks: the first
    // pass's 503/429, the second pass's usage) and none for the refusals: no instance reported a
    // request twice.
    advance(&gw, 5_200).await;
    let all = events(&bed.topic, 8, 5).await;
    assert_eq!(all.len(), 7, "{all:?}");

    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_provider_family_is_served_in_its_own_protocol() {
    let Some(mut bed) = Bed::for_test("each_provider_family_is_served_in_its_own_protocol").await
    else {
        return;
    };
    let sfx = bed.h.sfx.clone();
    bed.channel_keyed(
        &format!("ant-{sfx}"),
        json!({"provider": "claude", "models": ["claude-sonnet-4"]}),
        "sk-ant-upstream",
    )
    .await;
    bed.channel_keyed(
        &format!("gem-{sfx}"),
        json!({"provider": "gemini", "models": ["gemini-2.5-flash"]}),
        "AIza-upstream",
    )
    .await;
    bed.channel_keyed(
        &format!("gen-{sfx}"),
        json!({"provider": "generic", "models": ["local-llm"], "baseUrl": "http://llm.internal:8000"}),
        "sk-generic-upstream",
    )
    .await;
    // A misconfigured channel: named in its status, left out, and the others still serve.
    let broken = format!("az-{sfx}");
    bed.channel(
        &broken,
        json!({"provider": "azure", "models": ["gpt-azure"],
               "baseUrl": "https://acme.openai.azure.com/openai/deployments/d/chat/completions"}),
    )
    .await;
    let channels: Api<Channel> = Api::all(bed.h.client.clone());
    eventually("the broken channel names its problem", || async {
        let c = channels.get(&broken).await.unwrap();
        let conds = c.status?.common.conditions;
        conds
            .iter()
            .find(|c| c.type_ == "Ready" && c.reason == "ProviderConfigInvalid")
            .filter(|c| c.status == "False" && c.message.contains("api-version"))
            .map(|_| ())
    })
    .await;
    let tenant = format!("pf-{sfx}");
    let domain = format!("api.{tenant}.example");
    let key = format!("sk-client-{sfx}");
    bed.tenant(&tenant, &domain, &key, &[]).await;
    let gw = bed
        .gateway(&["claude-sonnet-4", "gemini-2.5-flash", "local-llm"])
        .await;
    for f in &mut gw.lock().unwrap().filters {
        assert!(f.host.configured, "{}: {:?}", f.name, f.host.state().logs);
    }
    let p = bed.provider.clone();
    let r = send(
        &gw,
        chat(
            &domain,
            &key,
            &json!({"model": "gpt-azure", "messages": []}),
        ),
    )
    .await;
    assert_eq!(
        r.status, 404,
        "the broken channel's model is not routed: {}",
        r.details
    );
    assert!(p.received().is_empty());
    // (model, stream, provider host, path fragment, key header, recording)
    let cases = [
        (
            "claude-sonnet-4",
            false,
            "api.anthropic.com",
            "/v1/messages",
            ("x-api-key", "sk-ant-upstream"),
            "anthropic-messages-nonstream-cache",
        ),
        (
            "claude-sonnet-4",
            true,
            "api.anthropic.com",
            "/v1/messages",
            ("x-api-key", "sk-ant-upstream"),
            "anthropic-messages-stream-basic-ping",
        ),
        (
            "gemini-2.5-flash",
            false,
            "generativelanguage.googleapis.com",
            ":generateContent",
            ("x-goog-api-key", "AIza-upstream"),
            "gemini-generatecontent-cached-thoughts",
        ),
        (
            "gemini-2.5-flash",
            true,
            "generativelanguage.googleapis.com",
            ":streamGenerateContent",
            ("x-goog-api-key", "AIza-upstream"),
            "gemini-streamgeneratecontent-thinking",
        ),
    ];
    for (n, (model, stream, host, path, (kh, kv), recording)) in cases.into_iter().enumerate() {
        let body = json!({"model": model, "stream": stream,
                          "messages": [{"role": "user", "content": "hi"}]});
        let r = send(&gw, chat(&domain, &key, &body)).await;
        let what = format!("{model} stream={stream}");
        assert_eq!(
            r.status,
            200,
            "{what}: {} {} {}",
            r.details,
            String::from_utf8_lossy(&r.body),
            logs(&gw)
        );
        let up = p.received().pop().unwrap();
        assert_eq!(up.header("host"), Some(host), "{what}");
        assert!(up.uri.contains(path), "{what}: {}", up.uri);
        assert_eq!(up.header(kh), Some(kv), "{what}");
        for (k, v) in &up.headers {
            assert!(
                !v.contains(&key),
                "{what}: the tenant key reached the provider in {k}"
            );
            assert!(
                !k.starts_with("x-aigw-") && k != "x-mse-consumer",
                "{what}: {k} reached the provider"
            );
        }
        let evs = events(&bed.topic, n + 1, 30).await;
        assert_eq!(evs.len(), n + 1, "{what}: {evs:?}");
        let ev = &evs[n];
        let (_, meta) = load_recording(recording).unwrap();
        let expected = &meta["expected"];
        assert_eq!(
            (ev.usage.prompt_tokens, ev.usage.completion_tokens),
            (
                expected["prompt_tokens"].as_u64(),
                expected["completion_tokens"].as_u64()
            ),
            "{what}: {ev:?}"
        );
    }

    // ai-proxy refuses a request it cannot translate with its own reply: the reporter, after
    // it, never sees the request; the credentials instance, before it, reports it as answered
    // inside the gateway, so billing charges nothing instead of the admission estimate.
    let before = p.received().len();
    let bad = json!({"model": "claude-sonnet-4", "messages": "not a list"});
    let r = send(&gw, chat(&domain, &key, &bad)).await;
    assert!(
        r.status >= 400 && r.details.contains("ai-proxy"),
        "{} {} {}",
        r.status,
        r.details,
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(p.received().len(), before, "the provider saw it");
    advance(&gw, 5_200).await;
    let evs = events(&bed.topic, cases.len() + 1, 30).await;
    assert_eq!(evs.len(), cases.len() + 1, "{evs:?}\n{}", logs(&gw));
    let ev = evs.last().unwrap();
    assert_eq!(ev.status, r.status, "{ev:?}");
    assert_eq!(
        ev.outcome,
        aigw_plugin_core::Outcome::UpstreamError,
        "{ev:?}"
    );
    assert_eq!(ev.usage.billable_tokens(), 0, "{ev:?}");
    assert!(ev.estimate.is_some(), "{ev:?}");
    assert_eq!(
        aigw_billing::worker::charged_usage(ev).unwrap(),
        None,
        "billed at its estimate: {ev:?}"
    );

    // A generic channel: ai-proxy asks it for no stream usage, so a stream must ask itself.
    let before = p.received().len();
    let implicit = json!({"model": "local-llm", "stream": true,
                          "messages": [{"role": "user", "content": "hi"}]});
    let r = send(&gw, chat(&domain, &key, &implicit)).await;
    assert!(
        String::from_utf8_lossy(&r.body).contains("stream_usage_required"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    refused("a generic stream without include_usage", &r, &p, before);
    let mut explicit = implicit.clone();
    explicit["stream_options"] = json!({"include_usage": true});
    let r = send(&gw, chat(&domain, &key, &explicit)).await;
    assert_eq!(r.status, 200, "{} {}", r.details, logs(&gw));
    let up = p.received().pop().unwrap();
    assert_eq!(
        up.header("authorization"),
        Some("Bearer sk-generic-upstream")
    );
    let sent: Value = serde_json::from_slice(&up.body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    let evs = events(&bed.topic, cases.len() + 2, 30).await;
    assert_eq!(evs.len(), cases.len() + 2, "{evs:?}");
    let ev = evs.last().unwrap();
    let (_, meta) = load_recording("openai-chat-stream-include-usage").unwrap();
    assert_eq!(
        ev.usage.prompt_tokens,
        meta["expected"]["prompt_tokens"].as_u64(),
        "{ev:?}"
    );

    // The reporter took the request on, but no upstream was picked (the channel's cluster is
    // gone): one report, the reporter's; the credentials instance leaves the request to it.
    gw.lock()
        .unwrap()
        .registries
        .retain(|r| !r.service.contains(&format!("gen-{sfx}")));
    let r = send(&gw, chat(&domain, &key, &explicit)).await;
    assert_eq!((r.status, r.details.as_str()), (503, "cluster_not_found"));
    advance(&gw, 5_200).await;
    let evs = events(&bed.topic, cases.len() + 4, 5).await;
    assert_eq!(evs.len(), cases.len() + 3, "one report: {evs:?}");
    assert_eq!(evs.last().unwrap().status, 503);
    bed.finish().await;
}

/// A CA and one certificate per domain (`aigw_testkit::tls`); returns the CA's DER and, per
/// domain, (cert PEM, key PEM, cert DER).
type Issued = (Vec<u8>, Vec<u8>, Vec<u8>);

fn certificates(domains: &[&str]) -> (Vec<u8>, Vec<Issued>) {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = |pem: &[u8]| CertificateDer::from_pem_slice(pem).unwrap().to_vec();
    let (ca, issued) = aigw_testkit::tls::certificates(domains).unwrap();
    let out = issued
        .into_iter()
        .map(|i| {
            let d = der(&i.cert_pem);
            (i.cert_pem, i.key_pem, d)
        })
        .collect();
    (der(&ca), out)
}

/// The certificate a real TLS client gets for `domain` from the server at `addr` (SNI = domain),
/// trusting only `ca`; `None` when the handshake fails.
async fn served_certificate(
    addr: std::net::SocketAddr,
    domain: &str,
    ca: &[u8],
) -> Option<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.to_vec())).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(domain.to_owned()).unwrap();
    let tls = connector.connect(name, tcp).await.ok()?;
    let (_, conn) = tls.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_domain_is_served_its_own_certificate() {
    let Some(mut bed) = Bed::for_test("each_tenant_domain_is_served_its_own_certificate").await
    else {
        return;
    };
    let sfx = bed.h.sfx.clone();
    let (a, b) = (format!("ta-{sfx}"), format!("tb-{sfx}"));
    let (dom_a, dom_b) = (format!("api.{a}.example"), format!("api.{b}.example"));
    bed.tenant(&a, &dom_a, &format!("sk-ta-{sfx}"), &[]).await;
    bed.tenant(&b, &dom_b, &format!("sk-tb-{sfx}"), &[]).await;
    let (ca, certs) = certificates(&[&dom_a, &dom_b]);
    let secret = |ns: &str, domain: &str, (crt, key): (&[u8], &[u8])| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": aigw_operator::tls::secret_name(domain), "namespace": ns},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": String::from_utf8_lossy(crt), "tls.key": String::from_utf8_lossy(key)}}))
        .unwrap()
    };
    let (ns_a, ns_b) = (format!("aigw-{a}"), format!("aigw-{b}"));
    for (ns, domain, (crt, key, _)) in [(&ns_a, &dom_a, &certs[0]), (&ns_b, &dom_b, &certs[1])] {
        Api::<Secret>::namespaced(bed.h.client.clone(), ns)
            .create(&PostParams::default(), &secret(ns, domain, (crt, key)))
            .await
            .unwrap();
    }
    // A decoy: tenant A's namespace holds a Secret named for B's domain, with A's certificate.
    Api::<Secret>::namespaced(bed.h.client.clone(), &ns_a)
        .create(
            &PostParams::default(),
            &secret(&ns_a, &dom_b, (&certs[0].0, &certs[0].1)),
        )
        .await
        .unwrap();

    // The operator's one ConfigMap for all tenants, read back.
    let maps: Api<ConfigMap> = Api::namespaced(bed.h.client.clone(), &bed.h.hns);
    let cert_doc = eventually("higress-https names both domains", || async {
        let cm = maps.get_opt(aigw_operator::tls::CONFIGMAP).await.unwrap()?;
        let doc = cm.data?.get(aigw_operator::tls::KEY)?.clone();
        (doc.contains(&dom_a) && doc.contains(&dom_b)).then_some(doc)
    })
    .await;
    let creds = aigw_standin::tls::credentials(&cert_doc).unwrap();
    let of = |d: &str| {
        creds
            .iter()
            .find(|c| c.domains == [d.to_owned()])
            .unwrap()
            .namespace
            .clone()
    };
    assert_eq!(
        (of(&dom_a), of(&dom_b)),
        (ns_a.clone(), ns_b.clone()),
        "each domain's Secret is in its own tenant's namespace"
    );
    let mut secrets = std::collections::HashMap::new();
    for c in &creds {
        if let Some(s) = Api::<Secret>::namespaced(bed.h.client.clone(), &c.namespace)
            .get_opt(&c.name)
            .await
            .unwrap()
        {
            let data = s.data.unwrap_or_default();
            let crt = data.get("tls.crt").map(|v| v.0.clone()).unwrap_or_default();
            let key = data.get("tls.key").map(|v| v.0.clone()).unwrap_or_default();
            secrets.insert((c.namespace.clone(), c.name.clone()), (crt, key));
        }
    }
    let resolver = aigw_standin::tls::SniResolver::new(&cert_doc, &|ns, name| {
        secrets.get(&(ns.to_owned(), name.to_owned())).cloned()
    })
    .unwrap();
    let acceptor =
        tokio_rustls::TlsAcceptor::from(aigw_standin::tls::server_config(resolver).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    assert_eq!(
        served_certificate(addr, &dom_a, &ca).await.as_deref(),
        Some(certs[0].2.as_slice()),
        "A's domain"
    );
    assert_eq!(
        served_certificate(addr, &dom_b, &ca).await.as_deref(),
        Some(certs[1].2.as_slice()),
        "B's domain gets B's certificate, not A's decoy"
    );
    assert_eq!(
        served_certificate(addr, "api.nobody.example", &ca).await,
        None,
        "no certificate for a domain no tenant serves"
    );

    // A tenant gone: its entry goes, the other stays.
    let tenants: Api<aigw_crds::Tenant> = Api::all(bed.h.client.clone());
    tenants
        .delete(&a, &kube::api::DeleteParams::default())
        .await
        .unwrap();
    eventually("A's domain leaves higress-https", || async {
        let doc = maps
            .get(aigw_operator::tls::CONFIGMAP)
            .await
            .unwrap()
            .data?
            .get(aigw_operator::tls::KEY)?
            .clone();
        (!doc.contains(&dom_a) && doc.contains(&dom_b)).then_some(())
    })
    .await;
    bed.finish().await;
}

/// Sign-in as Higress routes it: `/oauth/*` on a tenant's domain reaches the apiserver through
/// the gateway built from the operator's objects, with the tenant's `Host`, the client's
/// `Authorization` (ext-auth and the credential strip act on LLM routes only) and the cookie
/// intact; the tokens it issues name the tenant's domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_goes_through_the_gateway_to_the_apiserver() {
    use aigw_apiserver::sso::{self, Sso};
    use base64::Engine;
    let Some(mut bed) = Bed::for_test("sign_in_goes_through_the_gateway_to_the_apiserver").await
    else {
        return;
    };
    let sfx = bed.h.sfx.clone();
    bed.channel(
        &format!("oai-{sfx}"),
        json!({"provider": "openai", "models": ["gpt-4o"]}),
    )
    .await;
    let tenant = format!("sso-{sfx}");
    let domain = format!("api.{tenant}.example");
    let (tenant_id, _) = bed
        .tenant(&tenant, &domain, &format!("sk-client-{sfx}"), &["gpt-4o"])
        .await;
    // The identity provider, as the apiserver's REST listener runs it.
    let dir = std::env::temp_dir().join(format!("aigw-dp-sso-{sfx}"));
    sso::keys::generate(&dir.join("keys"), "k1").unwrap();
    let prefix = format!("test:{sfx}:sso:");
    let idp = Sso::new(
        sso::Settings {
            redis_prefix: prefix.clone(),
            ..sso::Settings::default()
        },
        bed.index.clone(),
        bed.h.db.clone(),
        redis::aio::ConnectionManager::new(bed.redis.clone())
            .await
            .unwrap(),
        sso::keys::Keys::load(&dir.join("keys")).unwrap(),
        sso::mail::Mailer::from_url("log", "AIGateway <noreply@aigateway.local>").unwrap(),
    )
    .unwrap();
    // The REST API on the same listener, serving this test's instance.
    let backend = aigw_apiserver::api::backend::Backend::new(
        idp,
        bed.index.clone(),
        bed.h.client.clone(),
        None,
        None,
        aigw_apiserver::api::backend::Settings {
            credentials_namespace: "aigw-system".into(),
            instance: Some(bed.h.instance.clone()),
        },
    );
    let (rest, _) = aigw_common::ops::serve(
        "127.0.0.1:0".parse().unwrap(),
        aigw_apiserver::app::router(Some(backend)),
        bed.shutdown.clone(),
    )
    .await
    .unwrap();
    let phc = sso::password::hash("correct horse battery staple").unwrap();
    let user: u64 = sqlx::query(
        "INSERT INTO users (tenant_id, username, email, password) VALUES (?, 'olga', 'olga@example.com', ?)",
    )
    .bind(tenant_id)
    .bind(phc)
    .execute(&bed.h.db)
    .await
    .unwrap()
    .last_insert_id();
    sqlx::query("INSERT INTO user_roles (user_id, tenant_id, role) VALUES (?, ?, 'owner')")
        .bind(user)
        .bind(tenant_id)
        .execute(&bed.h.db)
        .await
        .unwrap();
    let callback = "https://portal.example.com/cb";
    let (client_id, secret) = sso::store::register_client(
        &bed.h.db,
        tenant_id,
        "Portal",
        &[callback.to_owned()],
        &[],
        true,
    )
    .await
    .unwrap();
    let secret = secret.unwrap();

    let gw = bed.gateway(&["gpt-4o"]).await;
    gw.lock().unwrap().services.insert(
        "outbound|8080||aigw-apiserver.aigw-system.svc.cluster.local".into(),
        rest,
    );
    let req = |method: &str, path: &str, headers: Vec<(String, String)>, body: &str| Request {
        method: method.into(),
        authority: domain.clone(),
        path: path.into(),
        headers,
        body: body.as_bytes().to_vec(),
    };
    let r = send(
        &gw,
        req("GET", "/oauth/.well-known/openid-configuration", vec![], ""),
    )
    .await;
    assert_eq!(
        r.status,
        200,
        "{} {}",
        r.details,
        String::from_utf8_lossy(&r.body)
    );
    let doc: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(doc["issuer"], format!("https://{domain}/oauth"));

    // The login form posted through the gateway: a code for the client.
    let form = serde_urlencoded::to_string([
        ("response_type", "code"),
        ("client_id", client_id.as_str()),
        ("redirect_uri", callback),
        ("scope", "openid"),
        ("state", "s"),
        ("username", "olga"),
        ("password", "correct horse battery staple"),
    ])
    .unwrap();
    let form_type = (
        "content-type".to_owned(),
        "application/x-www-form-urlencoded".to_owned(),
    );
    let r = send(
        &gw,
        req("POST", "/oauth/authorize", vec![form_type.clone()], &form),
    )
    .await;
    assert_eq!(
        r.status,
        303,
        "{} {}",
        r.details,
        String::from_utf8_lossy(&r.body)
    );
    let location = r
        .headers
        .iter()
        .find(|(k, _)| k == "location")
        .unwrap()
        .1
        .clone();
    let cookie = r
        .headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .unwrap()
        .1
        .clone();
    assert!(cookie.contains("; Secure"), "{cookie}");
    let code = location
        .split("code=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_owned();

    // The token endpoint with HTTP Basic client authentication through the gateway.
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{client_id}:{secret}"));
    let body = serde_urlencoded::to_string([
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", callback),
    ])
    .unwrap();
    let r = send(
        &gw,
        req(
            "POST",
            "/oauth/token",
            vec![
                form_type,
                ("authorization".into(), format!("Basic {basic}")),
            ],
            &body,
        ),
    )
    .await;
    assert_eq!(
        r.status,
        200,
        "{} {}",
        r.details,
        String::from_utf8_lossy(&r.body)
    );
    let tokens: Value = serde_json::from_slice(&r.body).unwrap();
    let access = tokens["access_token"].as_str().unwrap();

    // The bearer token reaches userinfo; on another tenant's domain it is refused.
    let bearer = vec![("authorization".to_owned(), format!("Bearer {access}"))];
    let r = send(&gw, req("GET", "/oauth/userinfo", bearer.clone(), "")).await;
    assert_eq!(
        r.status,
        200,
        "{} {}",
        r.details,
        String::from_utf8_lossy(&r.body)
    );
    let info: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(info["tenant"]["id"], tenant_id);
    assert_eq!(info["roles"], json!(["owner"]));

    // A key created through the REST API, through the gateway: shown once, only its hash in the
    // Token; it authorises on the tenant's domain once the operator has mirrored it, and never on
    // another tenant's domain.
    let other = format!("sso-other-{sfx}");
    let other_domain = format!("api.{other}.example");
    bed.tenant(
        &other,
        &other_domain,
        &format!("sk-other-{sfx}"),
        &["gpt-4o"],
    )
    .await;
    let mut json_bearer = bearer.clone();
    json_bearer.push(("content-type".into(), "application/json".into()));
    let r = send(
        &gw,
        req(
            "POST",
            "/api/v1/keys",
            json_bearer,
            r#"{"displayName": "laptop", "models": ["gpt-4o"], "quota": 100000}"#,
        ),
    )
    .await;
    assert_eq!(
        r.status,
        201,
        "{} {}",
        r.details,
        String::from_utf8_lossy(&r.body)
    );
    let created_at = std::time::Instant::now();
    let created: Value = serde_json::from_slice(&r.body).unwrap();
    let api_key = created["apiKey"].as_str().unwrap().to_owned();
    let name = created["name"].as_str().unwrap().to_owned();
    assert_eq!(created["owner"], "olga");
    let tokens: Api<aigw_crds::Token> =
        Api::namespaced(bed.h.client.clone(), &format!("aigw-{tenant}"));
    let cr = tokens.get(&name).await.unwrap();
    assert_eq!(cr.spec.key_hash.as_deref(), Some(sha(&api_key).as_str()));
    assert!(
        !serde_json::to_string(&cr).unwrap().contains(&api_key),
        "the key itself is stored nowhere in the CR"
    );
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let served = eventually("the API-created key authorises", || async {
        let r = send(&gw, chat(&domain, &api_key, &body)).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(served.status, 200);
    eprintln!(
        "API-created key authorised {} ms after its create answer",
        created_at.elapsed().as_millis()
    );
    let r = send(&gw, chat(&other_domain, &api_key, &body)).await;
    assert_eq!(
        r.status,
        401,
        "a key of one tenant on another tenant's domain: {} {}",
        r.details,
        String::from_utf8_lossy(&r.body)
    );
    // The bearer token of this tenant creates nothing on the other tenant's domain.
    let r = send(
        &gw,
        Request {
            authority: other_domain.clone(),
            ..req("GET", "/api/v1/keys", bearer.clone(), "")
        },
    )
    .await;
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));

    aigw_testkit::delete_redis_prefix(&bed.redis, &prefix)
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bed.finish().await;
}

/// The data plane's cost per request is deterministic (wasm instructions, counted by the
/// engine), so a regression — in our plugins, or in a Higress build we adopt — fails here rather
/// than in a benchmark nobody runs: each plugin and the total stay within their budgets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_completion_stays_within_its_wasm_instruction_budget() {
    let Some(mut bed) =
        Bed::for_test("a_chat_completion_stays_within_its_wasm_instruction_budget").await
    else {
        return;
    };
    let (domain, key, gw) = bed.gpt4o_tenant("cost").await;
    let mut failures = Vec::new();
    for (shape, (label, stream)) in SHAPES.into_iter().enumerate() {
        let per = fuel_per_request(&bed, &gw, &domain, &key, stream, 5).await;
        eprintln!("{label}: {per:?}, total {}", per.values().sum::<u64>());
        let names: Vec<&str> = per.keys().map(String::as_str).collect();
        let budgeted: Vec<&str> = INSTRUCTION_BUDGETS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, budgeted, "the plugins on the request path");
        for (name, budgets) in INSTRUCTION_BUDGETS {
            let used = per[name];
            let budget = budgets[shape];
            assert!(used > 0, "{name} never ran on a {label} request");
            if used > budget {
                failures.push(format!(
                    "{label}: {name} executed {used} instructions, budget {budget}"
                ));
            }
        }
        let total: u64 = per.values().sum();
        let total_budget = TOTAL_INSTRUCTION_BUDGETS[shape];
        if total > total_budget {
            failures.push(format!(
                "{label}: {total} instructions in all, budget {total_budget}"
            ));
        }
    }
    assert!(failures.is_empty(), "over budget:\n{}", failures.join("\n"));
    bed.finish().await;
}
