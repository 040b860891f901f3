//! Schema fuzzing of the REST API with Schemathesis (from the Python package index; installed into
//! the test bed's cache by `scripts/testbed`), driven by the committed OpenAPI document: every
//! operation with generated
//! valid and invalid input, as a reseller owner and as a platform owner. Schemathesis checks that
//! nothing answers 5xx; a layer around the router records every answer and the test checks that
//! each 4xx is problem+json.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]

mod idp;

use std::sync::{Arc, Mutex};

use aigw_apiserver::sso::{jwt::Grant, roles::Role};
use idp::{Idp, T};
use serde_json::Value;

/// What the recorder saw: every answer, and those that break the contract.
#[derive(Debug, Default)]
struct Seen {
    answers: usize,
    by_status: std::collections::BTreeMap<u16, usize>,
    broken: Vec<String>,
}

fn token(idp: &Idp, t: &T, user: i64, role: Role) -> String {
    let site = idp.sso.site(&t.domain).expect("site");
    let grant = Grant {
        user_id: user,
        client_id: "fuzz".into(),
        scope: "openid".into(),
        sid: aigw_apiserver::sso::random_id(),
        family: aigw_apiserver::sso::random_id(),
        roles: vec![role],
    };
    idp.sso.mint_access(&site, &grant).unwrap().0
}

/// Runs Schemathesis against `base` as the holder of `bearer` on `domain`; its exit status.
fn schemathesis(base: &str, domain: &str, bearer: &str) -> (bool, String) {
    let tb = aigw_testkit::Testbed::load().unwrap();
    let bin = tb
        .var("SCHEMATHESIS")
        .expect("SCHEMATHESIS in the test bed's env file (make testbed installs it)")
        .to_owned();
    let out = std::process::Command::new(&bin)
        .args([
            "run",
            &format!("{base}/api/v1/openapi.json"),
            "--header",
            &format!("Host: {domain}"),
            "--header",
            &format!("Authorization: Bearer {bearer}"),
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "15",
            "--workers",
            "1",
            "--seed",
            "20261201",
            "--generation-database",
            "none",
            "--max-time",
            "60",
            "--request-timeout",
            "10",
        ])
        .env("NO_COLOR", "1")
        // Its caches go to a scratch directory, not into the checkout.
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_every_4xx_is_problem_json() {
    let idp = Idp::start(|_| {}).await;
    let reseller = idp.tenant("fuzz", "reseller", "Fuzz Co", Value::Null).await;
    let platform = idp
        .tenant("fuzzp", "platform", "Fuzz Platform", Value::Null)
        .await;
    let owner = idp.user(&reseller, "boss", "x", &["owner"]).await;
    let powner = idp.user(&platform, "root", "x", &["owner"]).await;
    for t in [&reseller, &platform] {
        let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(
            serde_json::json!({"metadata": {"name": format!("aigw-{}", t.name)}}),
        )
        .unwrap();
        kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(idp.client.clone())
            .create(&kube::api::PostParams::default(), &ns)
            .await
            .unwrap();
    }

    // The API on plain HTTP on loopback, with the recorder around it.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let recorder = seen.clone();
    let router = aigw_apiserver::app::router(Some(idp.backend.clone())).layer(
        axum::middleware::map_response(move |resp: axum::response::Response| {
            let recorder = recorder.clone();
            async move {
                let status = resp.status().as_u16();
                let ct = resp
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let mut s = recorder.lock().unwrap();
                s.answers += 1;
                *s.by_status.entry(status).or_default() += 1;
                if status >= 500 || (status >= 400 && ct != "application/problem+json") {
                    s.broken.push(format!("{status} {ct}"));
                }
                resp
            }
        }),
    );
    let (addr, _task) =
        aigw_common::ops::serve("127.0.0.1:0".parse().unwrap(), router, idp.shutdown.clone())
            .await
            .unwrap();
    let base = format!("http://{addr}");

    let runs = [
        (&reseller, token(&idp, &reseller, owner, Role::Owner)),
        (&platform, token(&idp, &platform, powner, Role::Owner)),
    ];
    let mut failures = Vec::new();
    for (t, bearer) in &runs {
        let (base, domain, bearer) = (base.clone(), t.domain.clone(), bearer.clone());
        let (ok, report) =
            tokio::task::spawn_blocking(move || schemathesis(&base, &domain, &bearer))
                .await
                .unwrap();
        eprintln!("--- schemathesis as the owner of {} ---\n{report}", t.name);
        if !ok {
            failures.push(format!("{}: {}", t.name, report));
        }
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!("answers by status: {:?}", seen.by_status);

    // Clean up what the fuzzer made: channels, settlements (keys and secrets go with the
    // namespaces).
    let channels = kube::Api::<aigw_crds::Channel>::all(idp.client.clone());
    let _ = channels
        .delete_collection(
            &kube::api::DeleteParams::default(),
            &kube::api::ListParams::default().labels(&format!(
                "{}={}",
                aigw_crds::labels::INSTANCE,
                idp.instance
            )),
        )
        .await;
    for t in [&reseller, &platform] {
        sqlx::query("DELETE FROM settlements WHERE tenant_id = ?")
            .bind(t.id)
            .execute(&idp.db)
            .await
            .unwrap();
    }
    idp.cleanup().await;

    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        seen.answers >= 300,
        "the fuzzer made {} calls",
        seen.answers
    );
    assert!(
        seen.by_status.keys().any(|s| (200..300).contains(s))
            && seen.by_status.keys().any(|s| (400..500).contains(s)),
        "both accepted and refused input: {:?}",
        seen.by_status
    );
    assert!(
        seen.broken.is_empty(),
        "answers that break the contract: {:?}",
        seen.broken
    );
}
