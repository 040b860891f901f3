//! The Helm chart (`charts/aigateway`), tested by the programs that consume it:
//!
//! - helm: `helm lint`, and the values schema refusing bad values with a message naming them;
//! - the test bed's kube-apiserver, with the CRDs of Higress, KEDA, the Prometheus Operator and
//!   Argo CD installed: every object the chart renders (all options on) and every Argo CD example
//!   is accepted by a server-side dry run;
//! - RBAC: the chart is installed, then the operator runs from the installed Deployment's env and
//!   mounted Secrets, authenticated as its `ServiceAccount` with a real token. It reconciles a
//!   Tenant the platform applies and a Token the tenant's administrator applies under the shipped
//!   `aigw-tenant-admin` role; neither of them can reach what their roles leave out.
//!
//! Hooks are skipped on install (no kubelet runs their Jobs here); the topics Job's own arguments
//! are run against the test bed's Kafka instead.

// Test code: a failed unwrap is a failed test with its message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use aigw_crds::{Channel, Tenant, Token};
use aigw_testkit::{Testbed, process::Service, scratch_namespace, unique_name};
use common::{Harness, eventually};
use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    batch::v1::Job,
    core::v1::{Namespace, Secret},
    rbac::v1::RoleBinding,
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::{Value, json};

/// A directory under the system's temp dir, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(unique_name("aigw-chart"));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/aigateway");

fn tool(tb: &Testbed, var: &'static str) -> Command {
    let mut cmd = Command::new(tb.var(var).unwrap());
    cmd.env("KUBECONFIG", tb.var("KUBECONFIG").unwrap());
    cmd
}

/// Runs `cmd`; returns (success, stdout, stderr).
fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The server's version, for `helm template --kube-version`.
fn server_version(tb: &Testbed) -> String {
    let (ok, out, err) = run(tool(tb, "KUBECTL").args(["version", "-o", "json"]));
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Values that make every secret and URL concrete (the test bed's servers).
fn base_values(tb: &Testbed, database_url: &str, higress_ns: &str) -> Vec<String> {
    [
        format!("secrets.databaseUrl={database_url}"),
        format!("secrets.redisUrl={}", tb.var("REDIS_URL").unwrap()),
        format!(
            "secrets.clickhouseUrl={}",
            tb.var("CLICKHOUSE_URL").unwrap()
        ),
        format!("secrets.channelKey={}", "42".repeat(32)),
        format!("kafka.brokers={}", tb.var("KAFKA_BROKERS").unwrap()),
        format!("higress.namespace={higress_ns}"),
    ]
    .into_iter()
    .flat_map(|v| ["--set".to_owned(), v])
    .collect()
}

fn template(tb: &Testbed, ns: &str, extra: &[&str]) -> (bool, String, String) {
    let version = server_version(tb);
    let mut cmd = tool(tb, "HELM");
    cmd.args(["template", "aigateway", CHART, "--namespace", ns])
        .args(["--kube-version", &version])
        .args(base_values(
            tb,
            tb.var("DATABASE_URL").unwrap(),
            "higress-system",
        ))
        .args(extra);
    run(&mut cmd)
}

fn kinds(yaml: &str) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for line in yaml.lines() {
        if let Some(kind) = line.strip_prefix("kind: ") {
            *kinds.entry(kind.trim().to_owned()).or_default() += 1;
        }
    }
    kinds
}

fn dry_run(tb: &Testbed, file: &Path) -> String {
    let (ok, out, err) = run(tool(tb, "KUBECTL")
        .args([
            "apply",
            "--dry-run=server",
            "--server-side",
            // A dry run: taking fields over from a release another test installed changes nothing.
            "--force-conflicts",
            "--field-manager=aigw-chart-test",
            "-f",
        ])
        .arg(file));
    assert!(ok, "the apiserver refused {}: {err}\n{out}", file.display());
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_lint_passes_and_the_apiserver_accepts_every_rendered_object() {
    let tb = Testbed::load().unwrap();
    let client = tb.kube_client().await.unwrap();
    aigw_crds::install(&client, "aigw-test").await.unwrap();
    let ns = scratch_namespace(&client, "aigw-chart").await.unwrap();
    let stores = scratch_namespace(&client, "chart-stores").await.unwrap();

    let (ok, out, err) = run(tool(&tb, "HELM").args(["lint", CHART]).args(base_values(
        &tb,
        "mysql://a:b@mysql:3306/aigateway",
        "higress-system",
    )));
    assert!(ok && out.contains("0 chart(s) failed"), "{out}{err}");
    // The packaged chart carries the CRDs themselves, not the link to them.
    let pkg = ScratchDir::new();
    let (ok, out, err) = run(tool(&tb, "HELM")
        .args(["package", CHART, "--destination"])
        .arg(pkg.path()));
    assert!(ok, "{out}{err}");
    let tgz = pkg.path().join("aigateway-0.1.0.tgz");
    let (ok, listing, err) = run(Command::new("tar").arg("tzf").arg(&tgz));
    assert!(
        ok && listing.contains("aigateway/crds/crds.yaml"),
        "{listing}{err}"
    );
    let (ok, packed, err) = run(Command::new("tar")
        .args(["xzOf"])
        .arg(&tgz)
        .arg("aigateway/crds/crds.yaml"));
    assert!(ok, "{err}");
    assert_eq!(
        packed,
        aigw_crds::crds_yaml().unwrap(),
        "the packaged CRDs are the generated ones"
    );

    // Every option on: KEDA, the Prometheus Operator's objects, dashboards, a data-store policy.
    let datastore = format!(
        "networkPolicy.dataStores[0].name=mysql,networkPolicy.dataStores[0].namespace={stores},\
         networkPolicy.dataStores[0].podSelector.app=mysql,networkPolicy.dataStores[0].ports[0]=3306"
    );
    let (ok, yaml, err) = template(
        &tb,
        &ns,
        &[
            "--set",
            "billing.worker.keda.enabled=true,monitoring.serviceMonitor.enabled=true",
            "--set",
            "monitoring.prometheusRule.enabled=true,monitoring.dashboards.enabled=true",
            "--set",
            "tracing.otlpEndpoint=http://otel-collector.monitoring:4318",
            "--set",
            &datastore,
            "--set",
            &format!("credentials.namespace={stores},credentials.createNamespace=false"),
            // The CRDs (crds/ links to the generated crds/crds.yaml: one definition).
            "--include-crds",
        ],
    );
    assert!(ok, "{err}");
    let kinds = kinds(&yaml);
    // Every workload exports traces to the collector (5 workloads: 4 Deployments, 1 StatefulSet).
    assert_eq!(
        yaml.matches("value: \"http://otel-collector.monitoring:4318\"")
            .count(),
        5,
        "OTLP endpoint on every workload"
    );
    for (kind, n) in [
        ("Deployment", 4),
        ("StatefulSet", 1),
        ("Service", 4),
        ("PodDisruptionBudget", 5),
        ("HorizontalPodAutoscaler", 3),
        ("ScaledObject", 1),
        ("NetworkPolicy", 7),
        ("Job", 2),
        ("ClusterRole", 6),
        ("ValidatingAdmissionPolicy", 3),
        ("ValidatingAdmissionPolicyBinding", 3),
        ("CustomResourceDefinition", 4),
        ("Role", 4),
        ("ServiceMonitor", 1),
        ("PrometheusRule", 1),
    ] {
        assert_eq!(kinds.get(kind), Some(&n), "{kind} in {kinds:?}");
    }
    let dir = ScratchDir::new();
    let file = dir.path().join("chart.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let out = dry_run(&tb, &file);
    let docs = kinds.values().sum::<usize>();
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("(server dry run)"))
            .count(),
        docs,
        "every rendered object answered for: {out}"
    );

    // The Argo CD examples against Argo CD's own CRDs.
    let argocd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/argocd");
    let mut n = 0;
    for entry in std::fs::read_dir(&argocd).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = dry_run(&tb, &path);
            assert!(out.contains("(server dry run)"), "{out}");
            n += 1;
        }
    }
    assert!(n >= 2, "Argo CD examples found: {n}");

    for n in [ns, stores] {
        Api::<Namespace>::all(client.clone())
            .delete(&n, &DeleteParams::default())
            .await
            .unwrap();
    }
}

#[test]
fn bad_values_are_refused_with_a_message_naming_them() {
    let tb = Testbed::load().unwrap();
    for (set, says) in [
        ("secrets.channelKey=not-hex", "/secrets/channelKey"),
        ("operator.tlsMode=acme", "/operator/acmeEmail"),
        ("operator.tlsMode=letsencrypt", "/operator/tlsMode"),
        (
            "kafka.topics.usage.partitions=0",
            "/kafka/topics/usage/partitions",
        ),
        ("kafka.brokers=kafka", "/kafka/brokers"),
        ("apiserver.authz.replicas=two", "/apiserver/authz/replicas"),
        ("sercrets.databaseUrl=x", "sercrets"),
        ("mail.url=log:/var/mail", "/mail/url"),
        ("tracing.sampleRatio=2", "/tracing/sampleRatio"),
        (
            "billing.worker.keda.minReplicas=0",
            "/billing/worker/keda/minReplicas",
        ),
    ] {
        let (ok, _, err) = template(&tb, "aigw-system", &["--set", set]);
        assert!(!ok, "{set} was accepted");
        assert!(err.contains(says), "{set}: {err}");
    }
    // Without a database URL (and no existing Secret) the chart says what to set.
    let version = server_version(&tb);
    let (ok, _, err) =
        run(tool(&tb, "HELM").args(["template", "aigateway", CHART, "--kube-version", &version]));
    assert!(!ok);
    assert!(err.contains("secrets.databaseUrl is required"), "{err}");
}

/// A kubeconfig authenticating as `ServiceAccount` `sa` in `ns` with a token from the
/// `TokenRequest` API (what the kubelet mounts into the pod), against the test bed's server.
fn service_account_kubeconfig(tb: &Testbed, ns: &str, sa: &str, dir: &Path) -> PathBuf {
    let (ok, token, err) =
        run(tool(tb, "KUBECTL").args(["create", "token", sa, "-n", ns, "--duration", "1h"]));
    assert!(ok, "{err}");
    let admin: Value =
        serde_yaml::from_str(&std::fs::read_to_string(tb.var("KUBECONFIG").unwrap()).unwrap())
            .unwrap();
    let cluster = admin["clusters"][0]["cluster"].clone();
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "bed", "cluster": cluster}],
        "users": [{"name": sa, "user": {"token": token.trim()}}],
        "contexts": [{"name": sa, "context": {"cluster": "bed", "user": sa}}],
        "current-context": sa,
    });
    let path = dir.join(format!("{sa}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    // A client certificate path in the admin kubeconfig would be relative to its directory.
    assert!(
        cluster["certificate-authority-data"].is_string()
            || cluster["certificate-authority"].is_string()
    );
    path
}

/// The env of the first container of a pod template as the kubelet would give it: values,
/// Secret keys, the downward API; and the Secret volumes written under `root` (their mount paths
/// rewritten in env values that point into them).
async fn pod_env(
    client: &kube::Client,
    ns: &str,
    pod: &Value,
    root: &Path,
) -> Vec<(String, String)> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let spec = &pod["spec"];
    let container = &spec["containers"][0];
    let mut mounts = Vec::new();
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let volume = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap();
        let secret = secrets
            .get(volume["secret"]["secretName"].as_str().unwrap())
            .await
            .unwrap();
        let dir = root.join(m["name"].as_str().unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        let data = secret.data.unwrap_or_default();
        match volume["secret"]["items"].as_array() {
            Some(items) => {
                for item in items {
                    let bytes = &data[item["key"].as_str().unwrap()].0;
                    std::fs::write(dir.join(item["path"].as_str().unwrap()), bytes).unwrap();
                }
            }
            None => {
                for (k, v) in &data {
                    std::fs::write(dir.join(k), &v.0).unwrap();
                }
            }
        }
        mounts.push((m["mountPath"].as_str().unwrap().to_owned(), dir));
    }
    let mut env = Vec::new();
    for e in container["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_owned()
        } else if e["valueFrom"].is_null() {
            // The apiserver drops an empty `value`.
            String::new()
        } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
            let s = secrets.get(r["name"].as_str().unwrap()).await.unwrap();
            String::from_utf8(s.data.unwrap()[r["key"].as_str().unwrap()].0.clone()).unwrap()
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap() {
                "metadata.namespace" => ns.to_owned(),
                "metadata.name" => {
                    format!("{}-0", pod["metadata"]["name"].as_str().unwrap_or("pod"))
                }
                "spec.serviceAccountName" => {
                    spec["serviceAccountName"].as_str().unwrap().to_owned()
                }
                other => panic!("unexpected fieldRef {other}"),
            }
        };
        let value = mounts
            .iter()
            .find_map(|(path, dir)| {
                value
                    .strip_prefix(path.as_str())
                    .map(|rest| format!("{}{rest}", dir.display()))
            })
            .unwrap_or(value);
        env.push((name, value));
    }
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn the_installed_operator_works_with_only_its_role_and_tenants_only_with_theirs() {
    let tb = Testbed::load().unwrap();
    let h = Harness::new().await;
    let client = h.client.clone();
    let ns = scratch_namespace(&client, "aigw-chart").await.unwrap();
    let (db_name, db) = tb.scratch_mysql("chart").await.unwrap();
    aigw_migrations::run_mysql(&db).await.unwrap();
    let base = tb.var("DATABASE_URL").unwrap();
    let database_url = format!("{}/{db_name}", base.rsplit_once('/').unwrap().0);

    // Install as a user would, taking over the tenant-admin role an earlier test applied from the
    // same file. No kubelet runs the hook Jobs here, so hooks are skipped and the one hook object
    // the pods need, the config Secret, is applied as helm would apply it.
    let creds = unique_name("aigw-creds");
    let mut values = base_values(&tb, &database_url, &h.hns);
    values.extend(["--set".to_owned(), format!("credentials.namespace={creds}")]);
    let (ok, out, err) = run(tool(&tb, "HELM")
        .args([
            "install",
            "aigateway",
            CHART,
            "--namespace",
            &ns,
            "--no-hooks",
            "--take-ownership",
        ])
        .args(&values));
    assert!(ok, "helm install: {out}{err}");
    let (ok, hook, err) = run(tool(&tb, "HELM")
        .args(["template", "aigateway", CHART, "--namespace", &ns])
        .args(["--kube-version", &server_version(&tb)])
        .args(["--show-only", "templates/config-secret.yaml"])
        .args(&values));
    assert!(ok, "{err}");
    let config: Secret = serde_yaml::from_str(&hook).unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &config)
        .await
        .unwrap();
    assert!(
        Api::<Namespace>::all(client.clone())
            .get_opt(&creds)
            .await
            .unwrap()
            .is_some(),
        "the chart made the credentials namespace"
    );

    // The operator as its Deployment runs it: the env and mounted Secret of the installed
    // object, the ServiceAccount's token. Test-only: the ops port on a free local address, and
    // the instance label so this operator reconciles only this test's objects.
    let dir = ScratchDir::new();
    let deployment: Deployment = Api::namespaced(client.clone(), &ns)
        .get("aigw-operator")
        .await
        .unwrap();
    let pod_template = serde_json::to_value(deployment.spec.unwrap().template).unwrap();
    assert_eq!(pod_template["spec"]["serviceAccountName"], "aigw-operator");
    let mut env = pod_env(&client, &ns, &pod_template, dir.path()).await;
    env.retain(|(k, _)| k != "AIGW_OPS_ADDR");
    let kubeconfig = service_account_kubeconfig(&tb, &ns, "aigw-operator", dir.path());
    env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
    env.push(("AIGW_INSTANCE".into(), h.instance.clone()));
    let vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let operator =
        Service::start(Path::new(env!("CARGO_BIN_EXE_aigw-operator")), &[], &vars).unwrap();
    operator.wait_for_status("/readyz", 200, 60).unwrap();

    // The platform applies a Tenant; the operator (as itself) makes its namespace, binds its own
    // tenant role there and reports Ready.
    let docs = h.example("reseller-tenant.yaml");
    h.apply_docs(&docs).await;
    let tenant = docs[0]["metadata"]["name"].as_str().unwrap().to_owned();
    let tenants: Api<Tenant> = Api::all(client.clone());
    h.ready(&tenants, &tenant).await;
    let tns = aigw_crds::tenant_namespace(&tenant);
    let binding: RoleBinding = Api::namespaced(client.clone(), &tns)
        .get(aigw_operator::tenant::GRANT_BINDING)
        .await
        .unwrap();
    assert_eq!(binding.role_ref.name, "aigw-operator-tenant");

    // The tenant's administrator, bound to the chart's aigw-tenant-admin in its namespace only,
    // applies a Token without a key; the operator generates the key into a Secret there.
    let admin_user = unique_name("chart-admin");
    let grant: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "tenant-admin", "namespace": tns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "aigw-tenant-admin"},
        "subjects": [{"kind": "User", "name": admin_user, "apiGroup": "rbac.authorization.k8s.io"}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), &tns)
        .create(&PostParams::default(), &grant)
        .await
        .unwrap();
    let as_admin = tb.kube_client_as(&admin_user).await.unwrap();
    let token_doc = h.example("token.yaml").remove(0);
    let token_name = token_doc["metadata"]["name"].as_str().unwrap().to_owned();
    assert_eq!(token_doc["metadata"]["namespace"], tns.as_str());
    let token: Token = serde_json::from_value(token_doc).unwrap();
    Api::<Token>::namespaced(as_admin.clone(), &tns)
        .create(&PostParams::default(), &token)
        .await
        .unwrap();
    let tokens: Api<Token> = Api::namespaced(client.clone(), &tns);
    h.ready(&tokens, &token_name).await;
    let key_secret = eventually("the generated key's Secret", || async {
        Api::<Secret>::namespaced(as_admin.clone(), &tns)
            .get_opt(&format!("{token_name}-key"))
            .await
            .unwrap()
    })
    .await;
    let key = &key_secret.data.unwrap()["apiKey"].0;
    assert!(key.len() > 20, "a generated key: {} bytes", key.len());

    // What the roles leave out. The tenant admin: no channel Secrets, no Channels, nothing in
    // another namespace, no Tenants.
    let forbidden = |r: Result<_, kube::Error>, what: &str| match r {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => panic!("{what}: expected 403, got {other:?}"),
    };
    forbidden(
        Api::<Secret>::namespaced(as_admin.clone(), &ns)
            .list(&ListParams::default())
            .await
            .map(|_| ()),
        "tenant admin lists the credentials namespace's Secrets",
    );
    let channel: Channel = serde_json::from_value(
        h.example("channels.yaml")
            .into_iter()
            .find(|d| d["kind"] == "Channel")
            .unwrap(),
    )
    .unwrap();
    forbidden(
        Api::<Channel>::all(as_admin.clone())
            .create(&PostParams::default(), &channel)
            .await
            .map(|_| ()),
        "tenant admin creates a Channel",
    );
    forbidden(
        Api::<Token>::namespaced(as_admin.clone(), &h.hns)
            .list(&ListParams::default())
            .await
            .map(|_| ()),
        "tenant admin lists Tokens in another namespace",
    );
    forbidden(
        Api::<Tenant>::all(as_admin.clone())
            .get(&tenant)
            .await
            .map(|_| ()),
        "tenant admin reads its Tenant",
    );
    // The operator's own token: no Secrets outside the credentials and tenant namespaces, no
    // Secrets cluster-wide, no workloads.
    let as_operator = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    forbidden(
        Api::<Secret>::namespaced(as_operator.clone(), "default")
            .list(&ListParams::default())
            .await
            .map(|_| ()),
        "operator lists Secrets in default",
    );
    forbidden(
        Api::<Secret>::all(as_operator.clone())
            .list(&ListParams::default())
            .await
            .map(|_| ()),
        "operator lists Secrets cluster-wide",
    );
    forbidden(
        Api::<Secret>::namespaced(as_operator.clone(), &tns)
            .list(&ListParams::default())
            .await
            .map(|_| ()),
        "operator lists a tenant namespace's Secrets (it may get and create only)",
    );
    forbidden(
        Api::<Deployment>::namespaced(as_operator.clone(), &ns)
            .list(&ListParams::default())
            .await
            .map(|_| ()),
        "operator lists Deployments",
    );
    // What RBAC cannot say, the admission policies refuse (the operator holds `rolebindings
    // create`, `bind` on its tenant role and `namespaces patch`, cluster-wide).
    let refused = |r: Result<_, kube::Error>, what: &str, says: &str| match r {
        Err(kube::Error::Api(e)) if e.message.contains(says) => {}
        other => panic!("{what}: expected a refusal saying {says:?}, got {other:?}"),
    };
    let self_binding = |namespace: &str, name: &str, subject: &str| -> RoleBinding {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "aigw-operator-tenant"},
            "subjects": [{"kind": "ServiceAccount", "name": subject, "namespace": ns}],
        }))
        .unwrap()
    };
    // The kube-apiserver enforces a new admission policy only once its policy informer has
    // loaded and compiled it, usually within seconds of `helm install` (CI once saw a request
    // still admitted 4 s after); a request before that is admitted. Wait for each policy with a dry-run request it must refuse (dry runs
    // pass admission and store nothing), then assert with real requests.
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let enforced = |r: Result<(), kube::Error>, says: &str| {
        matches!(r, Err(kube::Error::Api(e)) if e.message.contains(says)).then_some(())
    };
    eventually(
        "the operator's RoleBinding policy to be enforced",
        || async {
            enforced(
                Api::<RoleBinding>::namespaced(as_operator.clone(), "default")
                    .create(
                        &dry_run,
                        &self_binding("default", "aigw-operator", "aigw-operator"),
                    )
                    .await
                    .map(|_| ()),
                "tenant namespace it created",
            )
        },
    )
    .await;
    eventually("the operator's Namespace policy to be enforced", || async {
        enforced(
            Api::<Namespace>::all(as_operator.clone())
                .patch(
                    "default",
                    &kube::api::PatchParams {
                        dry_run: true,
                        ..kube::api::PatchParams::default()
                    },
                    &kube::api::Patch::Merge(
                        &json!({"metadata": {"labels": {"aigateway.io/tenant": "x"}}}),
                    ),
                )
                .await
                .map(|_| ()),
            "only aigw-<tenant> namespaces",
        )
    })
    .await;
    for (namespace, name, subject, says) in [
        (
            "default",
            "aigw-operator",
            "aigw-operator",
            "tenant namespace it created",
        ),
        (
            ns.as_str(),
            "aigw-operator",
            "aigw-operator",
            "tenant namespace it created",
        ),
        (
            creds.as_str(),
            "aigw-operator",
            "aigw-operator",
            "tenant namespace it created",
        ),
        (tns.as_str(), "aigw-operator", "default", "only to itself"),
        (
            tns.as_str(),
            "sneaky",
            "aigw-operator",
            "its own RoleBinding",
        ),
    ] {
        refused(
            Api::<RoleBinding>::namespaced(as_operator.clone(), namespace)
                .create(
                    &PostParams::default(),
                    &self_binding(namespace, name, subject),
                )
                .await
                .map(|_| ()),
            &format!("operator binds its tenant role as {name} to {subject} in {namespace}"),
            says,
        );
    }
    let ns_api: Api<Namespace> = Api::all(as_operator.clone());
    let label = |key: &str| json!({"metadata": {"labels": {key: "x"}}});
    for (target, patch, says) in [
        (
            "default",
            label("aigateway.io/tenant"),
            "only aigw-<tenant> namespaces",
        ),
        (
            h.hns.as_str(),
            label("app.kubernetes.io/managed-by"),
            "only aigw-<tenant> namespaces",
        ),
        (
            tns.as_str(),
            label("aigateway.io/tenant"),
            "tenant label of its own name",
        ),
    ] {
        refused(
            ns_api
                .patch(
                    target,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .map(|_| ()),
            &format!("operator relabels namespace {target}"),
            says,
        );
    }
    refused(
        ns_api
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": unique_name("aigw-fake"),
                    "labels": {"app.kubernetes.io/managed-by": "aigateway"}}}))
                .unwrap(),
            )
            .await
            .map(|_| ()),
        "operator makes a namespace with no Tenant",
        "tenant label of its own name",
    );
    // The REST API's Secret rights: an Opaque aigw-channel-* Secret in the credentials namespace,
    // nothing else (no service-account token, no other name, no other namespace).
    let api_kubeconfig = service_account_kubeconfig(&tb, &ns, "aigw-apiserver", dir.path());
    let as_api = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&api_kubeconfig).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let creds_secrets: Api<Secret> = Api::namespaced(as_api.clone(), &creds);
    let secret = |name: &str, kind: &str, annotations: Value| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations},
            "type": kind, "stringData": {"apiKey": "sk-test"},
        }))
        .unwrap()
    };
    let token_secret = secret(
        "aigw-channel-token",
        "kubernetes.io/service-account-token",
        json!({"kubernetes.io/service-account.name": "default"}),
    );
    eventually("the REST API's Secret policy to be enforced", || async {
        enforced(
            creds_secrets
                .create(&dry_run, &token_secret)
                .await
                .map(|_| ()),
            "only Opaque Secrets",
        )
    })
    .await;
    refused(
        creds_secrets
            .create(&PostParams::default(), &token_secret)
            .await
            .map(|_| ()),
        "apiserver mints a service-account token",
        "only Opaque Secrets",
    );
    refused(
        creds_secrets
            .create(
                &PostParams::default(),
                &secret("aigw-config", "Opaque", json!({})),
            )
            .await
            .map(|_| ()),
        "apiserver writes a Secret not named aigw-channel-*",
        "aigw-channel-<channel>",
    );
    forbidden(
        Api::<Secret>::namespaced(as_api.clone(), &ns)
            .create(
                &PostParams::default(),
                &secret("aigw-channel-x", "Opaque", json!({})),
            )
            .await
            .map(|_| ()),
        "apiserver writes a Secret in the release namespace",
    );
    creds_secrets
        .create(
            &PostParams::default(),
            &secret("aigw-channel-ok", "Opaque", json!({})),
        )
        .await
        .unwrap();
    // The tenant admin: no RoleBindings, no status, no Secret writes in its own namespace either.
    forbidden(
        Api::<RoleBinding>::namespaced(as_admin.clone(), &tns)
            .create(
                &PostParams::default(),
                &self_binding(&tns, "escalate", "aigw-operator"),
            )
            .await
            .map(|_| ()),
        "tenant admin creates a RoleBinding",
    );
    forbidden(
        Api::<Token>::namespaced(as_admin.clone(), &tns)
            .patch_status(
                &token_name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&json!({"status": {"usedQuota": 0}})),
            )
            .await
            .map(|_| ()),
        "tenant admin resets its Token's usedQuota",
    );
    forbidden(
        Api::<Secret>::namespaced(as_admin.clone(), &tns)
            .create(
                &PostParams::default(),
                &secret("planted", "Opaque", json!({})),
            )
            .await
            .map(|_| ()),
        "tenant admin writes a Secret",
    );

    // The other workloads' roles, asked of the RBAC authorizer for each call they make
    // (docs/deployment.md lists them) and for what they must not do.
    for (sa, verb, resource, namespace, want) in [
        ("aigw-apiserver", "watch", "tokens.aigateway.io", "", true),
        (
            "aigw-apiserver",
            "create",
            "tokens.aigateway.io",
            tns.as_str(),
            true,
        ),
        ("aigw-apiserver", "update", "tenants.aigateway.io", "", true),
        (
            "aigw-apiserver",
            "create",
            "channels.aigateway.io",
            "",
            true,
        ),
        ("aigw-apiserver", "patch", "secrets", creds.as_str(), true),
        ("aigw-apiserver", "get", "secrets", creds.as_str(), false),
        ("aigw-apiserver", "patch", "secrets", ns.as_str(), false),
        ("aigw-apiserver", "create", "secrets", tns.as_str(), false),
        ("aigw-authz", "watch", "tokens.aigateway.io", "", true),
        ("aigw-authz", "watch", "tenants.aigateway.io", "", true),
        ("aigw-authz", "watch", "channels.aigateway.io", "", true),
        (
            "aigw-authz",
            "create",
            "tokens.aigateway.io",
            tns.as_str(),
            false,
        ),
        ("aigw-authz", "update", "tenants.aigateway.io", "", false),
        ("aigw-authz", "get", "secrets", creds.as_str(), false),
        ("aigw-authz", "patch", "secrets", creds.as_str(), false),
        (
            "aigw-apiserver",
            "patch",
            "tokens.aigateway.io/status",
            tns.as_str(),
            false,
        ),
        (
            "aigw-worker",
            "patch",
            "tokens.aigateway.io/status",
            tns.as_str(),
            true,
        ),
        (
            "aigw-worker",
            "update",
            "tokens.aigateway.io",
            tns.as_str(),
            false,
        ),
        ("aigw-worker", "get", "secrets", ns.as_str(), false),
        (
            "aigw-ingest",
            "get",
            "tokens.aigateway.io",
            tns.as_str(),
            false,
        ),
        ("aigw-operator", "get", "secrets", creds.as_str(), true),
        ("aigw-operator", "get", "secrets", ns.as_str(), false),
        ("default", "list", "secrets", ns.as_str(), false),
    ] {
        let (resource, sub) = resource
            .split_once('/')
            .map_or((resource, None), |(r, s)| (r, Some(s)));
        let mut cmd = tool(&tb, "KUBECTL");
        cmd.args(["auth", "can-i", verb, resource, "--as"])
            .arg(format!("system:serviceaccount:{ns}:{sa}"));
        if let Some(sub) = sub {
            cmd.arg(format!("--subresource={sub}"));
        }
        if namespace.is_empty() {
            cmd.arg("--all-namespaces");
        } else {
            cmd.args(["-n", namespace]);
        }
        let (_, out, _) = run(&mut cmd);
        assert_eq!(
            out.trim() == "yes",
            want,
            "{sa} {verb} {resource} {sub:?} in {namespace:?}: {out}"
        );
    }

    // authz and the REST API as their Deployments run them, each as its own ServiceAccount (the
    // same test-only overrides: listeners on free local ports, the instance label).
    let domain = docs[0]["spec"]["domains"][0].as_str().unwrap().to_owned();
    let key = String::from_utf8(key.clone()).unwrap();
    let mut running = Vec::new();
    let pending = format!("test:{}:pending", h.instance);
    for (deployment, sa, listen_var) in [
        ("aigw-authz", "aigw-authz", "AIGW_AUTHZ_ADDR"),
        ("aigw-apiserver", "aigw-apiserver", "AIGW_LISTEN_ADDR"),
    ] {
        let d: Deployment = Api::namespaced(client.clone(), &ns)
            .get(deployment)
            .await
            .unwrap();
        let pod = serde_json::to_value(d.spec.unwrap().template).unwrap();
        assert_eq!(pod["spec"]["serviceAccountName"], sa);
        let mut env = pod_env(&client, &ns, &pod, dir.path()).await;
        if deployment == "aigw-authz" {
            assert!(
                env.iter().all(|(k, _)| k != "DATABASE_URL"),
                "authz gets no database credentials"
            );
        }
        let listen = aigw_testkit::process::free_addr().unwrap().to_string();
        env.retain(|(k, _)| k != "AIGW_OPS_ADDR" && k != listen_var);
        env.push((listen_var.into(), listen.clone()));
        let kubeconfig = service_account_kubeconfig(&tb, &ns, sa, dir.path());
        env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
        env.push(("AIGW_INSTANCE".into(), h.instance.clone()));
        // Its admitted requests' pending records under this test's own key (removed below), so
        // no other worker on the test bed ever sweeps and bills them.
        env.push(("AIGW_PENDING_KEY".into(), pending.clone()));
        let vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let bin = env!("CARGO_BIN_EXE_aigw-operator").replace("aigw-operator", "aigw-apiserver");
        let svc = Service::start(Path::new(&bin), &[], &vars).unwrap();
        svc.wait_for_status("/readyz", 200, 60)
            .unwrap_or_else(|e| panic!("{deployment} from its Deployment: {e}"));
        running.push((svc, listen));
    }
    // authz found the operator-generated key through its read-only watches; a wrong key is 401.
    let authz: std::net::SocketAddr = running[0].1.parse().unwrap();
    let ask = |k: &str| {
        let auth = format!("Bearer {k}");
        aigw_testkit::process::http_send(
            authz,
            "POST",
            "/authz",
            &[
                ("x-forwarded-host", domain.as_str()),
                ("x-forwarded-uri", "/v1/chat/completions"),
                ("x-forwarded-method", "POST"),
                ("content-type", "application/json"),
                ("authorization", auth.as_str()),
            ],
            br#"{"model":"gpt-4o","max_tokens":16,"messages":[]}"#,
        )
        .unwrap()
    };
    let good = eventually("authz knows the generated key", || async {
        let r = ask(&key);
        (r.status != 401).then_some(r)
    })
    .await;
    assert_eq!(good.status, 200, "{good:?}");
    assert!(good.header("x-aigw-token").is_some(), "{good:?}");
    assert_eq!(ask("sk-not-a-key-of-anyone-000000000000").status, 401);
    // The REST API serves its document (its readiness already needed MySQL, Redis, the index).
    let api: std::net::SocketAddr = running[1].1.parse().unwrap();
    let doc = aigw_testkit::process::http_request(api, "GET", "/api/v1/openapi.json", &[]).unwrap();
    assert_eq!(doc.status, 200);
    for (svc, _) in running {
        assert!(svc.terminate(15).unwrap().success());
    }
    aigw_testkit::delete_redis_prefix(&tb.redis().unwrap(), &pending)
        .await
        .unwrap();

    // The topics hook Job's own arguments, against the test bed's Kafka (fresh topic names).
    let prefix = unique_name("chart");
    let (ok, yaml, err) = template(
        &tb,
        &ns,
        &[
            "--set",
            &format!(
                "kafka.brokers={},kafka.topics.usage.replicationFactor=1,kafka.topics.deadLetter.replicationFactor=1,\
                 kafka.topics.tenantEvents.replicationFactor=1,kafka.topics.alertEvents.replicationFactor=1,\
                 kafka.topics.usage.name={prefix}.usage,kafka.topics.deadLetter.name={prefix}.dlq,\
                 kafka.topics.tenantEvents.name={prefix}.tenant,kafka.topics.alertEvents.name={prefix}.alert",
                tb.var("KAFKA_BROKERS").unwrap()
            ),
            "--show-only",
            "templates/jobs.yaml",
        ],
    );
    assert!(ok, "{err}");
    let job: Job = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .find(|j: &Job| j.metadata.name.as_deref() == Some("aigw-topics"))
        .unwrap();
    let pod = serde_json::to_value(job.spec.unwrap().template).unwrap();
    let args: Vec<String> =
        serde_json::from_value(pod["spec"]["containers"][0]["args"].clone()).unwrap();
    assert_eq!(args[0], "topics");
    let env = pod_env(&client, &ns, &pod, dir.path()).await;
    // `cargo test --workspace` builds every package's binaries before running any test.
    let billing = env!("CARGO_BIN_EXE_aigw-operator").replace("aigw-operator", "aigw-billing");
    assert!(
        Path::new(&billing).exists(),
        "{billing} missing: cargo build -p aigw-billing"
    );
    for round in ["created", "as asked"] {
        let out = Command::new(&billing)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(&args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.matches(&format!(": {round}")).count(), 4, "{stdout}");
    }

    // The worker StatefulSet's pod gets its own name as the Kafka static member id.
    let worker: StatefulSet = Api::namespaced(client.clone(), &ns)
        .get("aigw-worker")
        .await
        .unwrap();
    let pod = serde_json::to_value(worker.spec.unwrap().template).unwrap();
    assert!(
        pod["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "AIGW_CONSUMER_INSTANCE"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name")
    );

    // Clean up while the operator runs (it removes its finalizers), then the release.
    tokens
        .delete(&token_name, &DeleteParams::default())
        .await
        .unwrap();
    tenants
        .delete(&tenant, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the tenant gone", || async {
        tenants
            .get_opt(&tenant)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(operator.terminate(15).unwrap().success());
    let (ok, out, err) =
        run(tool(&tb, "HELM").args(["uninstall", "aigateway", "--namespace", &ns]));
    assert!(ok, "{out}{err}");
    // The signing keys, the config Secret (a hook) and the credentials namespace are kept on
    // uninstall by design; this test removes them with their namespaces.
    for n in [&ns, &creds] {
        Api::<Namespace>::all(client.clone())
            .delete(n, &DeleteParams::default())
            .await
            .unwrap();
    }
    h.finish().await;
}

#[test]
fn the_alerts_fire_on_series_that_should_trigger_them_and_only_those() {
    let tb = Testbed::load().unwrap();
    let (ok, yaml, err) = template(
        &tb,
        "aigw-system",
        &[
            "--set",
            "monitoring.prometheusRule.enabled=true",
            "--show-only",
            "templates/monitoring.yaml",
        ],
    );
    assert!(ok, "{err}");
    let rule: Value = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(rule["kind"], "PrometheusRule");
    let dir = ScratchDir::new();
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&rule["spec"]).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        Path::new(CHART).join("promtool/alerts_test.yaml"),
        dir.path().join("alerts_test.yaml"),
    )
    .unwrap();
    let (ok, out, err) = run(Command::new(tb.var("PROMTOOL").unwrap())
        .current_dir(dir.path())
        .args(["test", "rules", "alerts_test.yaml"]));
    assert!(ok && out.contains("SUCCESS"), "{out}{err}");
    // Every alert of the rule has a test.
    let tests = std::fs::read_to_string(dir.path().join("alerts_test.yaml")).unwrap();
    for r in rule["spec"]["groups"][0]["rules"].as_array().unwrap() {
        let name = r["alert"].as_str().unwrap();
        assert!(
            tests.contains(&format!("alertname: {name}")),
            "{name} untested"
        );
    }
}

/// The dashboards' queries, run by their consumers: each `PromQL` expression parsed by promtool (as
/// a recording rule), each ClickHouse query run against the test bed's `usage_logs`, with
/// Grafana's macros and variables replaced as Grafana would.
#[test]
fn every_dashboard_query_parses_in_prometheus_and_runs_in_clickhouse() {
    let tb = Testbed::load().unwrap();
    let dir = Path::new(CHART).join("files/dashboards");
    let mut promql = Vec::new();
    let mut sql = Vec::new();
    let mut dashboards = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        dashboards += 1;
        for panel in d["panels"].as_array().unwrap() {
            for t in panel["targets"].as_array().unwrap() {
                let fill = |q: &str| {
                    q.replace(
                        "$__timeFilter(created_at)",
                        "created_at >= now() - INTERVAL 1 DAY",
                    )
                    .replace("$__timeInterval(created_at)", "toStartOfMinute(created_at)")
                    .replace("$tenant", ".*")
                    .replace("$namespace", "aigw-system")
                };
                if let Some(e) = t["expr"].as_str() {
                    promql.push(fill(e));
                } else {
                    sql.push(fill(t["rawSql"].as_str().unwrap()));
                }
            }
        }
    }
    assert_eq!(dashboards, 5, "the seed's five dashboards");
    let rules = json!({"groups": [{"name": "dashboards", "rules": promql.iter().enumerate()
        .map(|(i, e)| json!({"record": format!("dashboard:q{i}"), "expr": e})).collect::<Vec<_>>()}]});
    let scratch = ScratchDir::new();
    let file = scratch.path().join("dashboards.yaml");
    std::fs::write(&file, serde_yaml::to_string(&rules).unwrap()).unwrap();
    let (ok, out, err) = run(Command::new(tb.var("PROMTOOL").unwrap())
        .args(["check", "rules"])
        .arg(&file));
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("{} rules found", promql.len())),
        "{out}"
    );
    let url = format!(
        "{}/?database={}",
        tb.var("CLICKHOUSE_URL").unwrap(),
        tb.var("CLICKHOUSE_DATABASE").unwrap()
    );
    assert!(sql.len() >= 4, "{sql:?}");
    for q in sql {
        let (ok, out, err) =
            run(Command::new("curl").args(["-sS", "--fail-with-body", &url, "--data-binary", &q]));
        assert!(ok, "ClickHouse refused {q}: {out}{err}");
    }
}
