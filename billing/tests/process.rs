//! Both billing roles start for real against the test bed (Kafka, ClickHouse, Redis, MySQL), report
//! ready, and exit cleanly on SIGTERM.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use aigw_testkit::{
    Testbed,
    process::{Service, free_addr},
};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_aigw-billing"))
}

#[test]
fn worker_becomes_ready_and_stops_on_sigterm() {
    let tb = Testbed::load().unwrap();
    let svc = Service::start(bin(), &["worker"], &tb.vars()).unwrap();
    assert_eq!(svc.wait_for_status("/readyz", 200, 30).unwrap(), "ready\n");
    assert!(svc.terminate(10).unwrap().success());
}

#[test]
fn ingest_becomes_ready_and_stops_on_sigterm() {
    let tb = Testbed::load().unwrap();
    let listen = free_addr().unwrap().to_string();
    let mut envs = tb.vars();
    envs.push(("AIGW_INGEST_SECRET", "process-test-ingest-secret"));
    let svc = Service::start(bin(), &["ingest", "--listen-addr", &listen], &envs).unwrap();
    assert_eq!(svc.wait_for_status("/readyz", 200, 30).unwrap(), "ready\n");
    assert!(svc.terminate(10).unwrap().success());
}

#[test]
fn refuses_to_start_without_kafka_brokers() {
    let out = std::process::Command::new(bin())
        .env_clear()
        .args(["worker", "--ops-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--kafka-brokers"), "{stderr}");
}
