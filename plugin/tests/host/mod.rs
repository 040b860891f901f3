//! The stand-in's proxy-wasm host (`aigw_standin::host`) with test-facing wrappers: a trap or a
//! failed build fails the calling test, with the plugin's logs.

// Test fixture: panics are test failures.
#![allow(dead_code, clippy::panic, clippy::needless_pass_by_value)]

#[allow(unused_imports)]
pub use aigw_standin::host::{Headers, Host, HttpCall, ROOT, State};

fn fail<T>(e: aigw_standin::host::Error) -> T {
    panic!("{e}")
}

/// Our reporter's module, built as `make wasm` builds it.
pub fn build_wasm() -> &'static [u8] {
    aigw_standin::plugins::reporter().unwrap_or_else(fail)
}

/// An OpenAI chat completion stream of `n` content chunks shaped like a recorded one (each event
/// carries `id`, `object`, `created`, `model`, `service_tier`, `system_fingerprint`, one choice
/// with a one-token delta, `usage: null` and `obfuscation`; about 300 bytes, mostly keys and
/// punctuation), then the usage chunk and `[DONE]`.
pub fn openai_stream(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend(
            format!(
                "data: {{\"id\":\"chatcmpl-C4Hq5a6K3RaPMymUv70btQNYv6SvY\",\"object\":\"chat.completion.chunk\",\"created\":1755137921,\"model\":\"gpt-5-nano-2025-08-07\",\"service_tier\":\"default\",\"system_fingerprint\":null,\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null,\"obfuscation\":\"WuQNX{:03}\"}}\n\n",
                i % 100,
                i % 1000
            )
            .as_bytes(),
        );
    }
    out.extend(b"data: {\"id\":\"chatcmpl-C4Hq5a6K3RaPMymUv70btQNYv6SvY\",\"object\":\"chat.completion.chunk\",\"created\":1755137921,\"model\":\"gpt-5-nano-2025-08-07\",\"service_tier\":\"default\",\"system_fingerprint\":null,\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":4000,\"total_tokens\":4012,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":3000,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}},\"obfuscation\":\"ab\"}\n\ndata: [DONE]\n\n");
    out
}

/// A text-heavy chat stream: `n` chunks of a sentence with escapes and non-ASCII text each,
/// then the usage chunk and `[DONE]`.
pub fn text_stream(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend(format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1790000000,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i} — some text with \\\"quotes\\\" and unicode é\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
        ).as_bytes());
    }
    out.extend(b"data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":5000,\"total_tokens\":5100}}\n\ndata: [DONE]\n\n");
    out
}

/// Wasm instructions (wasmtime fuel) our reporter executes for a streamed response `body`, from
/// its first body chunk (Envoy's 16 KiB) to the dispatched usage event; and the event's total.
pub fn parser_fuel(body: &[u8]) -> (u64, u64) {
    let config = br#"{"version":1,"mode":"report","ingestCluster":"ingest","ingestSecret":"x"}"#;
    let (mut h, ok) = load_with(build_wasm(), config, true);
    assert!(ok, "configured");
    let id = h.new_http();
    h.request_headers(
        id,
        &[
            (":path", "/v1/chat/completions"),
            ("x-request-id", "r"),
            ("x-aigw-event-id", "ev-1"),
            ("x-higress-llm-model", "gpt-5-nano"),
            ("x-aigw-tenant", "1"),
            ("x-aigw-user", "u"),
            ("x-aigw-token", "2"),
            ("x-aigw-reservation", "r1:4096"),
        ],
        true,
    );
    h.response_headers(
        id,
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    );
    let before = h.fuel_used();
    let chunks: Vec<&[u8]> = body.chunks(16 * 1024).collect();
    for (i, c) in chunks.iter().enumerate() {
        h.response_body(id, c, i + 1 == chunks.len());
    }
    // The root context sends the event on its next tick.
    h.finish(id);
    h.tick();
    let used = h.fuel_used() - before;
    assert_eq!(h.state().calls.len(), 1, "the event was dispatched");
    let event = aigw_plugin_core::UsageEvent::parse(&h.state().calls[0].body)
        .unwrap_or_else(|e| panic!("the event does not parse: {e}"));
    (used, event.usage.total_tokens.unwrap_or(0))
}

/// Loads `wasm` configured with `config`; the host and what `proxy_on_configure` answered.
pub fn load(wasm: &[u8], config: &[u8]) -> (Host, bool) {
    Host::load(wasm, config).unwrap_or_else(fail)
}

/// [`load`] with fuel metering.
pub fn load_with(wasm: &[u8], config: &[u8], fuel: bool) -> (Host, bool) {
    Host::start(wasm, config, fuel, aigw_standin::host::Shared::default()).unwrap_or_else(fail)
}

fn owned(headers: &[(&str, &str)]) -> Headers {
    headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Test-facing calls into a loaded plugin.
pub trait Drive {
    fn new_http(&mut self) -> i32;
    fn request_headers(&mut self, id: i32, headers: &[(&str, &str)], end: bool) -> i32;
    fn response_headers(&mut self, id: i32, headers: &[(&str, &str)], end: bool) -> i32;
    fn response_body(&mut self, id: i32, chunk: &[u8], end: bool) -> i32;
    fn finish(&mut self, id: i32);
    fn retire_root(&mut self) -> bool;
    fn tick(&mut self);
    fn call_response(&mut self, id: i32, token: u32, status: u16);
}

impl Drive for Host {
    fn new_http(&mut self) -> i32 {
        self.create_http().unwrap_or_else(fail)
    }
    fn request_headers(&mut self, id: i32, headers: &[(&str, &str)], end: bool) -> i32 {
        self.state().request_headers = owned(headers);
        self.on_request_headers(id, end).unwrap_or_else(fail)
    }
    fn response_headers(&mut self, id: i32, headers: &[(&str, &str)], end: bool) -> i32 {
        self.state().response_headers = owned(headers);
        self.on_response_headers(id, end).unwrap_or_else(fail)
    }
    fn response_body(&mut self, id: i32, chunk: &[u8], end: bool) -> i32 {
        chunk.clone_into(&mut self.state().response_chunk);
        self.on_response_body(id, end).unwrap_or_else(fail)
    }
    fn finish(&mut self, id: i32) {
        self.end_stream(id).unwrap_or_else(fail);
    }
    fn retire_root(&mut self) -> bool {
        self.retire().unwrap_or_else(fail)
    }
    fn tick(&mut self) {
        self.on_tick().unwrap_or_else(fail);
    }
    fn call_response(&mut self, id: i32, token: u32, status: u16) {
        self.deliver(
            id,
            token,
            vec![(":status".into(), status.to_string())],
            Vec::new(),
        )
        .unwrap_or_else(fail);
    }
}
