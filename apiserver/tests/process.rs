//! The apiserver binary starts for real against the test bed: ops endpoints, a problem+json 404
//! on the REST listener, and a clean exit on SIGTERM.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use aigw_testkit::{
    Testbed,
    process::{Service, free_addr, http_get},
};

#[test]
fn serves_json_errors_becomes_ready_and_stops_on_sigterm() {
    let tb = Testbed::load().unwrap();
    let api = free_addr().unwrap().to_string();
    let authz = free_addr().unwrap().to_string();
    let svc = Service::start(
        Path::new(env!("CARGO_BIN_EXE_aigw-apiserver")),
        &["--listen-addr", &api, "--authz-addr", &authz],
        &tb.vars(),
    )
    .unwrap();
    assert_eq!(svc.wait_for_status("/readyz", 200, 30).unwrap(), "ready\n");

    let (status, body) = http_get(api.parse().unwrap(), "/nothing-here").unwrap();
    assert_eq!(status, 404);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["status"], 404);
    assert_eq!(json["detail"], "no route for /nothing-here");
    // Without signing keys there is no sign-in and so no token for the API: both say so instead
    // of pretending to be absent.
    for path in ["/oauth/jwks", "/api/v1/keys"] {
        let (status, body) = http_get(api.parse().unwrap(), path).unwrap();
        assert_eq!(status, 503, "{path}: {body}");
        assert!(body.contains("--oidc-keys-dir"), "{body}");
    }

    assert!(svc.terminate(10).unwrap().success());
}
