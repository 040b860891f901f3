//! The operator binary starts for real against the test bed, reports ready once kube and MySQL
//! answer, serves metrics, and exits cleanly on SIGTERM.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use aigw_testkit::{Testbed, process::Service, unique_name};

/// The test bed's variables plus an instance label no CR carries, so this operator process
/// reconciles nothing that other tests own.
fn vars(tb: &Testbed) -> Vec<(&str, String)> {
    let mut v: Vec<(&str, String)> = tb
        .vars()
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect();
    v.push(("AIGW_INSTANCE", unique_name("process-test")));
    v.push(("AIGW_INGEST_SECRET", SECRET.to_owned()));
    v
}

const SECRET: &str = "process-test-ingest-secret";

#[test]
fn starts_becomes_ready_and_stops_on_sigterm() {
    let tb = Testbed::load().unwrap();
    let vars = vars(&tb);
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let svc = Service::start(Path::new(env!("CARGO_BIN_EXE_aigw-operator")), &[], &vars).unwrap();
    assert_eq!(svc.wait_for_status("/healthz", 200, 30).unwrap(), "ok\n");
    assert_eq!(svc.wait_for_status("/readyz", 200, 30).unwrap(), "ready\n");
    let metrics = svc.wait_for_status("/metrics", 200, 5).unwrap();
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    let status = svc.terminate(15).unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn is_not_ready_while_a_dependency_is_down() {
    let tb = Testbed::load().unwrap();
    let vars = vars(&tb);
    let mut vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Nothing listens on port 1: MySQL stays unreachable, so readiness must say so.
    vars.retain(|(k, _)| *k != "DATABASE_URL");
    vars.push(("DATABASE_URL", "mysql://aigw:aigw@127.0.0.1:1/aigateway"));
    let svc = Service::start(Path::new(env!("CARGO_BIN_EXE_aigw-operator")), &[], &vars).unwrap();
    // kube becomes ready, mysql never does; /readyz names exactly the missing dependency.
    svc.wait_for("/readyz", 30, |status, body| {
        status == 503 && body == "not ready: mysql\n"
    })
    .unwrap();
    assert!(svc.terminate(15).unwrap().success());
}

#[test]
fn refuses_to_start_without_a_usable_ingest_secret() {
    // An operator writing an empty secret into the usage reporter's config would let every usage
    // report be refused (401) while traffic flows: it must not start at all.
    let tb = Testbed::load().unwrap();
    for secret in [None, Some(""), Some("short")] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_aigw-operator"));
        cmd.env_clear();
        for (k, v) in tb.vars() {
            cmd.env(k, v);
        }
        cmd.env("AIGW_INSTANCE", unique_name("no-secret"));
        cmd.env("AIGW_OPS_ADDR", "127.0.0.1:0");
        if let Some(s) = secret {
            cmd.env("AIGW_INGEST_SECRET", s);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{secret:?}: started anyway");
        assert!(stderr.contains("ingest secret"), "{secret:?}: {stderr}");
    }
}

#[test]
fn refuses_to_start_with_an_ingest_cluster_envoy_cannot_name() {
    // The reporter calls this cluster and the operator writes a route for it; a malformed name
    // would leave usage reports with nowhere to go.
    let tb = Testbed::load().unwrap();
    for cluster in ["aigw-ingest:8090", "outbound|x||svc", "outbound|8090||"] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_aigw-operator"));
        cmd.env_clear();
        for (k, v) in vars(&tb) {
            cmd.env(k, v);
        }
        cmd.env("AIGW_INSTANCE", unique_name("bad-cluster"));
        cmd.env("AIGW_OPS_ADDR", "127.0.0.1:0");
        cmd.env("AIGW_INGEST_CLUSTER", cluster);
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cluster}: started anyway");
        assert!(stderr.contains("ingestCluster"), "{cluster}: {stderr}");
    }
}
