//! The usage reporter end to end: the real plugin `.wasm` in the wasmtime proxy-wasm test host
//! (standing in for Envoy, which cannot run here) reports a response; the host forwards the
//! dispatched call to the real ingest process → Kafka → the worker → a ClickHouse row with the
//! right cost.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../plugin/tests/host/mod.rs"]
mod host;

use common::{Bed, SECRET, clickhouse_sums, start_ingest};
use host::{Drive, build_wasm, load};

#[tokio::test(flavor = "multi_thread")]
async fn a_reported_response_becomes_a_priced_row() {
    let bed = Bed::new("billing_plugin").await;
    let (ingest, ingest_addr) = start_ingest(&bed, None);
    let worker = bed.start_worker(100);

    let config = format!(
        r#"{{"version":1,"mode":"report","ingestCluster":"outbound|8090||aigw-ingest","ingestSecret":"{SECRET}"}}"#
    );
    let (mut host, ok) = load(build_wasm(), config.as_bytes());
    assert!(ok);
    host.state().properties.insert(
        "cluster_name".into(),
        b"outbound|443||aigw-openai-main.dns".to_vec(),
    );
    let request_id = aigw_testkit::unique_ident("req");
    let id = host.new_http();
    host.request_headers(
        id,
        &[
            (":path", "/v1/chat/completions"),
            ("x-aigw-event-id", &request_id),
            ("x-higress-llm-model", "gpt-4o"),
            ("x-aigw-tenant", "1"),
            ("x-aigw-user", "alice"),
            ("x-aigw-token", "11"),
            ("x-aigw-reservation", "none"),
        ],
        true,
    );
    host.response_headers(
        id,
        &[(":status", "200"), ("content-type", "application/json")],
        false,
    );
    let body = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../plugin/core/tests/fixtures/openai-chat.json"
    ))
    .unwrap();
    host.response_body(id, &body, true);
    host.finish(id);
    host.tick();
    let call = host
        .state()
        .calls
        .pop()
        .expect("the plugin dispatched the event");

    // The host forwards the call to the real ingest, as Envoy would to the ingest cluster.
    let headers: Vec<(&str, &str)> = call
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with(':'))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let resp = aigw_testkit::process::http_send(
        ingest_addr,
        call.header(":method").unwrap(),
        call.header(":path").unwrap(),
        &headers,
        &call.body,
    )
    .unwrap();
    assert_eq!(resp.status, 202, "{}", resp.body);
    host.call_response(host::ROOT, call.token, resp.status);
    assert_eq!(host.metric("aigw_usage_report_failures"), Some(0));

    bed.drained(90).await;
    let sums = clickhouse_sums(&bed.ch, 1, true).await;
    // 2048 prompt (1920 cached) + 300 completion at acme's gpt-4o price 3.00 / 1.50 / 12.00:
    // (128 × 3 + 1920 × 1.5 + 300 × 12) / 1e6; platform 2.50 / 1.25 / 10.00; upstream 1.00 / 4.00.
    assert_eq!(
        (
            sums.events,
            sums.cost.as_str(),
            sums.platform_cost.as_str(),
            sums.upstream_cost.as_str(),
            sums.tokens
        ),
        (1, "0.006864", "0.005720", "0.003248", 2348)
    );
    assert!(worker.terminate(15).unwrap().success());
    assert!(ingest.terminate(15).unwrap().success());
}
