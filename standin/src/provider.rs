//! The provider stand-in: an HTTP server answering as OpenAI, Anthropic and Gemini do, by
//! replaying recorded response bodies — upstream LLM providers cannot run here. It records every
//! request it receives, and fails on demand (a scripted status, e.g. 503 or 429, or a connection
//! reset mid-answer).
//!
//! The recordings are read in place from `AIGW_LLM_RESPONSES`, by default
//! `../shared/reference/llm-responses/` next to the project (other projects' recordings, never
//! copied into the repo); [`recording`] names the case served for each API.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::Value;

use crate::host::{Error, Headers, Result};

/// A request the provider received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Names lower-case, `host` included.
    pub headers: Headers,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::host::header(&self.headers, name)
    }
}

/// A scripted answer: served instead of the recording, first in first out.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// What the next request gets instead of its plain recording.
#[derive(Debug, Clone)]
enum Next {
    Answer(Scripted),
    /// The recording, with the connection reset after this many bytes of body.
    Cut(usize),
}

#[derive(Debug, Default)]
struct Inner {
    received: Vec<Received>,
    script: VecDeque<Next>,
}

/// A running provider stand-in.
#[derive(Debug, Clone)]
pub struct Provider {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

/// The folder of recorded provider responses.
pub fn recordings_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("AIGW_LLM_RESPONSES") {
        return Ok(dir.into());
    }
    Ok(crate::plugins::workspace_root()?.join("../shared/reference/llm-responses"))
}

/// The recording served for a request: by API (path) and whether it streams.
pub fn recording(path: &str, body: &[u8]) -> Option<&'static str> {
    let stream = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|b| b["stream"].as_bool())
        .unwrap_or(false);
    let path = path.split('?').next().unwrap_or(path);
    Some(if path.ends_with("/chat/completions") {
        if stream {
            "openai-chat-stream-include-usage"
        } else {
            "openai-chat-nonstream-cached"
        }
    } else if path.ends_with("/messages") {
        if stream {
            "anthropic-messages-stream-basic-ping"
        } else {
            "anthropic-messages-nonstream-cache"
        }
    } else if path.contains(":streamGenerateContent") {
        "gemini-streamgeneratecontent-thinking"
    } else if path.contains(":generateContent") {
        "gemini-generatecontent-cached-thoughts"
    } else if path.ends_with("/embeddings") {
        "openai-embeddings"
    } else if path.ends_with("/responses") {
        if stream {
            "openai-responses-stream-reasoning"
        } else {
            "openai-responses-nonstream-basic"
        }
    } else {
        return None;
    })
}

/// A recording's body and its metadata (`expected` usage, `content_type`, …).
pub fn load_recording(name: &str) -> Result<(Vec<u8>, Value)> {
    let dir = recordings_dir()?;
    let read = |ext: &str| {
        let p = dir.join(format!("{name}.{ext}"));
        std::fs::read(&p).map_err(|e| Error(format!("{}: {e}", p.display())))
    };
    let meta: Value =
        serde_json::from_slice(&read("json")?).map_err(|e| Error(format!("{name}.json: {e}")))?;
    Ok((read("body")?, meta))
}

impl Provider {
    /// Starts the stand-in on a loopback port (on the current tokio runtime).
    pub async fn start() -> Result<Self> {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let state = inner.clone();
        let app = Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move { answer(&state, method, uri, headers, body.to_vec()) }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error(format!("bind: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error(format!("addr: {e}")))?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, inner })
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.inner
            .lock()
            .map(|i| i.received.clone())
            .unwrap_or_default()
    }

    /// Queues an answer served instead of the next recording.
    pub fn script(&self, answer: Scripted) {
        if let Ok(mut i) = self.inner.lock() {
            i.script.push_back(Next::Answer(answer));
        }
    }

    /// Queues a provider that dies mid-answer: the next request gets its recording, and the
    /// connection is reset after `bytes` bytes of its body.
    pub fn cut_next(&self, bytes: usize) {
        if let Ok(mut i) = self.inner.lock() {
            i.script.push_back(Next::Cut(bytes));
        }
    }
}

fn answer(
    state: &Mutex<Inner>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Vec<u8>,
) -> Response {
    let path = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_owned(), ToString::to_string);
    let received = Received {
        method: method.to_string(),
        uri: path.clone(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.clone(),
    };
    let scripted = state.lock().ok().and_then(|mut i| {
        i.received.push(received);
        i.script.pop_front()
    });
    let cut = match &scripted {
        Some(Next::Cut(n)) => Some(*n),
        _ => None,
    };
    let (status, content_type, bytes) = match scripted {
        Some(Next::Answer(s)) => (s.status, s.content_type, s.body),
        Some(Next::Cut(_)) | None => match recording(&path, &body).map(load_recording) {
            Some(Ok((bytes, meta))) => (
                200,
                meta["content_type"]
                    .as_str()
                    .unwrap_or("application/json")
                    .to_owned(),
                bytes,
            ),
            Some(Err(e)) => (500, "text/plain".into(), e.0.into_bytes()),
            None => (
                404,
                "application/json".into(),
                br#"{"error":{"message":"unknown path","type":"invalid_request_error"}}"#.to_vec(),
            ),
        },
    };
    let body = match cut {
        // A body that fails after `n` bytes: hyper then closes the connection without ending
        // the chunked body, as a provider crashing mid-stream does.
        Some(n) => {
            use futures::StreamExt as _;
            let first = Bytes::from(bytes[..n.min(bytes.len())].to_vec());
            // The part is sent and flushed first (hyper drops unflushed data when the body
            // fails); then the failure.
            Body::from_stream(futures::stream::iter([true, false]).then(move |part| {
                let first = first.clone();
                async move {
                    if part {
                        Ok(first)
                    } else {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        Err(std::io::Error::other("provider reset mid-answer"))
                    }
                }
            }))
        }
        None => Body::from(bytes),
    };
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", content_type)
        .body(body)
        .unwrap_or_else(|_| Response::new(Body::empty()))
}
