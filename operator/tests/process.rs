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
    v
}

#[test]
fn starts_becomes_ready_and_stops_on_sigterm() {
    let tb = Testbed::load().unwrap();
    let svc = Service::start(
        Path::new(env!("CARGO_BIN_EXE_aigw-operator")),
        &[],
        &tb.vars(),
    )
    .unwrap();
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
