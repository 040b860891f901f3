//! The login pages in a real browser: Debian's Chromium, driven over WebDriver by its
//! chromedriver, with JavaScript switched off. Each tenant domain shows its own name, logo and
//! theme colour and nothing of the other's; signing in works without JavaScript and ends at the
//! client with a code that the token endpoint accepts. A screenshot of each tenant's page is kept
//! under `target/tmp/sso-screenshots/`.

// Test code: a failed unwrap is a failed test with its message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]

mod idp;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, extract::State, routing::get};
use base64::Engine;
use idp::{Idp, T, param};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const PASSWORD: &str = "correct horse battery staple";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A WebDriver session of chromedriver.
struct Browser {
    http: reqwest::Client,
    base: String,
    driver: std::process::Child,
}

impl Browser {
    async fn start() -> Self {
        let port = aigw_testkit::process::free_addr().unwrap().port();
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("chromedriver (Debian's chromium-driver; `make testbed` installs it): {e}")
            });
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{root}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=900,820", "--ignore-certificate-errors",
                     "--host-resolver-rules=MAP *.sso.test 127.0.0.1"],
            // No JavaScript at all: the pages must work without it.
            "prefs": {"profile.managed_default_content_settings.javascript": 2}
        }}}});
        let r: Value = http
            .post(format!("{root}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_owned();
        Self {
            http,
            base: format!("{root}/session/{id}"),
            driver,
        }
    }

    /// A WebDriver command; the whole answer (`value` may be an error).
    async fn request(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap().json().await.unwrap()
    }

    /// A WebDriver command that must succeed; its `value`.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let v = self.request(method, path, body).await;
        assert!(v["value"].get("error").is_none(), "WebDriver {path}: {v}");
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().unwrap().to_owned()
    }

    /// Waits (up to 10 s) until an element matches: a click that submits a form returns before
    /// the next page may have loaded.
    async fn wait_for(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self
                .request(
                    reqwest::Method::POST,
                    "/element",
                    Some(json!({"using": "css selector", "value": css})),
                )
                .await;
            if v["value"].get(ELEMENT).is_some() {
                return;
            }
            if Instant::now() > deadline {
                let url = self.url().await;
                let source = self.source().await;
                panic!("no {css} on {url}:\n{source}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.call(reqwest::Method::GET, &format!("/element/{e}/text"), None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn css(&self, css: &str, property: &str) -> String {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::GET,
            &format!("/element/{e}/css/{property}"),
            None,
        )
        .await
        .as_str()
        .unwrap()
        .to_owned()
    }

    async fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::GET,
            &format!("/element/{e}/attribute/{name}"),
            None,
        )
        .await
        .as_str()
        .map(str::to_owned)
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn screenshot(&self, name: &str) -> std::path::PathBuf {
        let b64 = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("sso-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    async fn quit(mut self) {
        let _ = self.http.delete(&self.base).send().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A local web server for what the browser fetches besides our pages: the tenants' logos and
/// the client's redirect URI (which records the queries it got).
async fn side_server() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let logo = |color: &'static str, text: &'static str| {
        move |State(seen): State<Arc<Mutex<Vec<String>>>>| async move {
            seen.lock().unwrap().push(format!("logo:{text}"));
            (
                [("content-type", "image/svg+xml")],
                format!(
                    "<svg xmlns='http://www.w3.org/2000/svg' width='160' height='48'><rect width='160' height='48' rx='8' fill='{color}'/>\
                     <text x='80' y='31' font-size='20' font-family='sans-serif' fill='white' text-anchor='middle'>{text}</text></svg>"
                ),
            )
        }
    };
    let app = Router::new()
        .route("/logo-acme.svg", get(logo("#aa3300", "ACME")))
        .route(
            "/callback",
            get(
                |State(seen): State<Arc<Mutex<Vec<String>>>>, uri: axum::http::Uri| async move {
                    seen.lock()
                        .unwrap()
                        .push(format!("callback:{}", uri.query().unwrap_or("")));
                    "signed in"
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

fn rgb(hex: &str) -> String {
    let c = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).unwrap();
    format!("rgba({}, {}, {}, 1)", c(1), c(3), c(5))
}

#[tokio::test]
async fn each_tenant_domain_shows_its_own_login_page_and_signs_in_without_javascript() {
    let (side, seen) = side_server().await;
    let idp = Idp::start(|_| {}).await;
    let logo = format!("http://{side}/logo-acme.svg");
    let a = idp
        .tenant(
            "web-acme",
            "reseller",
            "Acme AI",
            json!({"themeColor": "#aa3300", "logoUrl": logo}),
        )
        .await;
    let b = idp
        .tenant(
            "web-beta",
            "reseller",
            "Beta Cloud",
            json!({"themeColor": "#0a7d32"}),
        )
        .await;
    idp.user(&a, "alice", PASSWORD, &["owner"]).await;
    idp.user(&b, "bob", PASSWORD, &["user"]).await;
    let redirect = format!("http://{side}/callback");
    let browser = Browser::start().await;

    let verifier = "a-verifier-of-at-least-forty-three-characters-0123456789";
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(Sha256::digest(verifier.as_bytes()));
    let authorize = |t: &T, client: &str| {
        format!(
            "{}/authorize?{}",
            idp.issuer(t),
            serde_urlencoded::to_string([
                ("response_type", "code"),
                ("client_id", client),
                ("redirect_uri", redirect.as_str()),
                ("scope", "openid profile"),
                ("state", "st-1"),
                ("code_challenge", challenge.as_str()),
                ("code_challenge_method", "S256"),
            ])
            .unwrap()
        )
    };

    for (t, color, other, user) in [
        (&a, "#aa3300", "Beta Cloud", "alice"),
        (&b, "#0a7d32", "Acme AI", "bob"),
    ] {
        let (client, _) = idp.client(t, &redirect, false).await;
        browser.goto(&authorize(t, &client)).await;
        let display = if t.name == a.name {
            "Acme AI"
        } else {
            "Beta Cloud"
        };
        assert_eq!(browser.text("#tenant-name").await, display);
        assert_eq!(
            browser.css("#sign-in", "background-color").await,
            rgb(color)
        );
        let source = browser.source().await;
        assert!(
            !source.contains(other),
            "{display}'s page shows nothing of {other}"
        );
        assert!(
            !source.to_lowercase().contains("<script"),
            "no JavaScript on the page"
        );
        if t.name == a.name {
            assert_eq!(
                browser.attribute("header img", "src").await.as_deref(),
                Some(logo.as_str())
            );
        } else {
            assert!(!source.contains("<img"), "no logo configured, none shown");
        }
        let shot = browser
            .screenshot(&format!("login-{display}").replace(' ', "-"))
            .await;
        println!("screenshot: {}", shot.display());

        // A wrong password: the page says so, still branded.
        browser.type_into("#username", user).await;
        browser.type_into("#password", "not the password").await;
        browser.click("#sign-in").await;
        browser.wait_for("#error").await;
        assert_eq!(browser.text("#error").await, "Wrong username or password.");
        assert_eq!(browser.text("#tenant-name").await, display);

        // Signing in (the form kept the request's parameters): back at the client with a code.
        browser.type_into("#password", PASSWORD).await;
        browser.click("#sign-in").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let landed = loop {
            let url = browser.url().await;
            if url.starts_with(&redirect) {
                break url;
            }
            assert!(Instant::now() < deadline, "stuck at {url}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(param(&landed, "state").as_deref(), Some("st-1"));
        let code = param(&landed, "code").unwrap();
        let r = idp
            .http(&[t])
            .post(format!("{}/token", idp.issuer(t)))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", redirect.as_str()),
                ("client_id", client.as_str()),
                ("code_verifier", verifier),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let tokens: Value = r.json().await.unwrap();
        assert_eq!(
            idp::payload(tokens["access_token"].as_str().unwrap())["tenant"]["name"],
            t.name
        );
    }
    assert!(
        seen.lock().unwrap().iter().any(|s| s == "logo:ACME"),
        "the browser loaded Acme's logo"
    );
    browser.quit().await;
    idp.cleanup().await;
}
