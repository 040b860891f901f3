//! Usage extraction from LLM responses: OpenAI chat completions, Responses and embeddings; Anthropic
//! Messages; Gemini / Vertex `generateContent` and `streamGenerateContent` — as one JSON body, a
//! root JSON array (Gemini's non-SSE stream) or an SSE stream, fed in arbitrary chunks.
//!
//! The shape is recognised from the documents themselves, not from the route, so a response
//! converted by ai-proxy and a native one parse alike. Counts follow the normalized convention
//! (see [`crate::TokenUsage`]): a count the provider did not send stays `None`; nothing is estimated.
//!
//! | provider | where usage is | rule |
//! |---|---|---|
//! | OpenAI chat / embeddings | `usage` (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens` / `.cache_write_tokens`, `completion_tokens_details.reasoning_tokens`) | last non-null wins |
//! | OpenAI Responses | `usage` of an `object: response` body, or `response.usage` of `response.completed` / `.incomplete` / `.failed` events | last wins |
//! | Anthropic | `message.usage` of `message_start` (or `usage` of a `type: message` body), then each `message_delta.usage` field by field | prompt = input + cache write + cache read |
//! | Gemini | `usageMetadata` of every chunk (cumulative) | last wins; completion = candidates + thoughts |

use std::borrow::Cow;

use serde_json::Value;

use crate::{
    Outcome, TokenUsage,
    scan::{Document, Scanner, find_below},
};

/// How the body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `text/event-stream`.
    Sse,
    /// A JSON document (or a root array of documents).
    Json,
    /// Unknown content type: decided by the first non-blank byte (`{`/`[` → JSON, else SSE).
    Sniff,
}

impl Framing {
    /// From a response `content-type`.
    pub fn from_content_type(ct: Option<&str>) -> Self {
        match ct.map(str::to_ascii_lowercase) {
            Some(c) if c.starts_with("text/event-stream") => Self::Sse,
            Some(c) if c.contains("json") => Self::Json,
            _ => Self::Sniff,
        }
    }
}

/// What a response said about usage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    pub usage: TokenUsage,
    /// Model echoed by the upstream.
    pub model: Option<String>,
    pub outcome: Outcome,
    /// Upstream error message (or type), when there was one.
    pub error: Option<String>,
}

// The capture slots: one per field of a document the rules read. `model` and `modelVersion`
// share one (the last in the document wins), as do `message.*` and `response.*`.
const TYPE: u8 = 0;
const OBJECT: u8 = 1;
const MODEL: u8 = 2;
const USAGE: u8 = 3;
const USAGE_METADATA: u8 = 4;
const ERROR: u8 = 5;
const NESTED_USAGE: u8 = 6;
const NESTED_MODEL: u8 = 7;
const NESTED_ERROR: u8 = 8;

fn wanted(p: &[&[u8]]) -> Option<u8> {
    Some(match p {
        [b"type"] => TYPE,
        [b"object"] => OBJECT,
        [b"model" | b"modelVersion"] => MODEL,
        [b"usage"] => USAGE,
        [b"usageMetadata"] => USAGE_METADATA,
        [b"error"] => ERROR,
        [b"message" | b"response", b"usage"] => NESTED_USAGE,
        [b"message" | b"response", b"model"] => NESTED_MODEL,
        [b"message" | b"response", b"error"] => NESTED_ERROR,
        _ => return None,
    })
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Anthropic {
    input: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
    output: Option<u64>,
    thinking: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SseLine {
    /// Reading the field name (bytes so far in `field`).
    Field,
    /// Streaming a `data` value into the scanner; `bool` = the optional space may still come.
    Data(bool),
    /// Reading an `event` value into `event`.
    Event(bool),
    /// Skipping to the end of the line (comments, other fields).
    Skip,
}

/// The incremental parser: `feed` chunks, then `finish`.
// The flags are independent facts about the stream seen so far, not a state in disguise.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug)]
pub struct UsageParser {
    framing: Framing,
    scanner: Scanner,
    /// What the documents said so far.
    seen: Seen,
    // SSE line state.
    line: SseLine,
    field: Vec<u8>,
    event: Vec<u8>,
    /// First bytes of the current event's data, to recognise `[DONE]`.
    data_head: Vec<u8>,
    data_seen: bool,
    after_cr: bool,
    bytes: u64,
}

/// What the documents of a response said so far.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Default)]
struct Seen {
    usage: TokenUsage,
    anthropic: Option<Anthropic>,
    model: Option<String>,
    error: Option<String>,
    /// A final marker was seen (`[DONE]`, `response.completed`, `message_stop`, a closed JSON body).
    complete: bool,
    /// Responses `response.incomplete`.
    incomplete: bool,
    /// The stream's format ends with a marker.
    expects_marker: bool,
    /// At least one JSON document closed.
    any_document: bool,
}

const DONE: &[u8] = b"[DONE]";
/// How much of an event's data is kept to recognise `[DONE]` (with surrounding whitespace).
const DATA_HEAD: usize = 16;

/// The first CR or LF in `hay`. One word test finds every byte below 0x0E (a tab, vertical tab or
/// form feed too, which are passed over): cheaper in wasm than testing for two bytes.
fn line_end(hay: &[u8]) -> Option<usize> {
    let mut from = 0;
    loop {
        let at = from + find_below(hay.get(from..)?, 0x0E)?;
        if matches!(hay.get(at), Some(b'\r' | b'\n')) {
            return Some(at);
        }
        from = at + 1;
    }
}

fn get(v: &Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_u64()
}

impl UsageParser {
    pub fn new(framing: Framing) -> Self {
        Self {
            framing,
            scanner: Scanner::new(wanted),
            seen: Seen::default(),
            line: SseLine::Field,
            field: Vec::new(),
            event: Vec::new(),
            data_head: Vec::new(),
            data_seen: false,
            after_cr: false,
            bytes: 0,
        }
    }

    /// Feeds the next chunk of the response body.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut chunk = chunk;
        if self.framing == Framing::Sniff {
            let Some(first) = chunk.iter().position(|b| !b.is_ascii_whitespace()) else {
                return;
            };
            self.framing = if matches!(chunk[first], b'{' | b'[') {
                Framing::Json
            } else {
                Framing::Sse
            };
            chunk = &chunk[first..];
        }
        self.bytes += chunk.len() as u64;
        match self.framing {
            Framing::Json => self.scanner.feed(chunk, &mut |d| self.seen.document(d)),
            _ => self.feed_sse(chunk),
        }
    }

    fn feed_sse(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    i += 1;
                    continue;
                }
            }
            if b == b'\r' || b == b'\n' {
                self.after_cr = b == b'\r';
                self.end_line();
                i += 1;
                continue;
            }
            match self.line {
                SseLine::Field => {
                    // Most lines are `data:` lines: the field name read in one step.
                    if self.field.is_empty() && chunk[i..].starts_with(b"data:") {
                        self.line = self.data_line();
                        i += 5;
                        continue;
                    }
                    if b == b':' {
                        self.line = match self.field.as_slice() {
                            b"data" => self.data_line(),
                            b"event" => {
                                self.event.clear();
                                SseLine::Event(true)
                            }
                            _ => SseLine::Skip, // comment (empty field) or id/retry
                        };
                    } else if self.field.len() < 8 {
                        self.field.push(b);
                    } else {
                        self.line = SseLine::Skip;
                    }
                    i += 1;
                }
                SseLine::Data(first) => {
                    // Stream the rest of the line straight into the scanner.
                    let end = line_end(&chunk[i..]).map_or(chunk.len(), |p| i + p);
                    let mut part = &chunk[i..end];
                    if !part.is_empty() {
                        // The one optional space after `data:` is decided by the first byte
                        // of the value, whichever chunk it arrives in.
                        if first && part[0] == b' ' {
                            part = &part[1..];
                        }
                        self.line = SseLine::Data(false);
                    }
                    if self.data_head.len() < DATA_HEAD {
                        let take = (DATA_HEAD - self.data_head.len()).min(part.len());
                        self.data_head.extend_from_slice(&part[..take]);
                    }
                    self.scanner.feed(part, &mut |d| self.seen.document(d));
                    i = end;
                }
                SseLine::Event(first) => {
                    if !(first && b == b' ') && self.event.len() < 64 {
                        self.event.push(b);
                    }
                    self.line = SseLine::Event(false);
                    i += 1;
                }
                SseLine::Skip => i += 1,
            }
        }
    }

    /// A `data` field's value starts.
    fn data_line(&mut self) -> SseLine {
        if self.data_seen {
            // Multi-line data joins with a newline (JSON whitespace).
            self.scanner.feed(b"\n", &mut |d| self.seen.document(d));
            if self.data_head.len() < DATA_HEAD {
                self.data_head.push(b'\n');
            }
        }
        self.data_seen = true;
        SseLine::Data(true)
    }

    fn end_line(&mut self) {
        let blank = self.line == SseLine::Field && self.field.is_empty();
        self.line = SseLine::Field;
        self.field.clear();
        if blank {
            self.dispatch_event();
        }
    }

    /// An SSE event ended (blank line or end of body).
    fn dispatch_event(&mut self) {
        if self.data_head.len() < DATA_HEAD && self.data_head.trim_ascii() == DONE {
            self.seen.complete = true;
        }
        if self.event.as_slice() == b"message_stop" {
            self.seen.complete = true;
        }
        if self.event.as_slice() == b"error" && self.seen.error.is_none() {
            self.seen.error = Some("error event".to_owned());
        }
        self.scanner.reset();
        self.event.clear();
        self.data_head.clear();
        self.data_seen = false;
    }

    /// Ends the body. `status` is the upstream HTTP status; `ended` says whether the body reached
    /// its end (false when the stream was cut, e.g. the client or upstream went away).
    pub fn finish(mut self, status: u16, ended: bool) -> Extracted {
        if matches!(self.framing, Framing::Sse) {
            if self.line != SseLine::Field || !self.field.is_empty() {
                self.end_line();
            }
            if self.data_seen || !self.event.is_empty() {
                self.dispatch_event();
            }
        }
        if let Some(a) = self.seen.anthropic {
            let prompt = a
                .input
                .map(|i| i + a.cache_creation.unwrap_or(0) + a.cache_read.unwrap_or(0));
            self.seen.usage = TokenUsage {
                prompt_tokens: prompt,
                completion_tokens: a.output,
                cached_input_tokens: a.cache_read,
                cache_creation_input_tokens: a.cache_creation,
                reasoning_tokens: a.thinking,
                total_tokens: match (prompt, a.output) {
                    (None, None) => None,
                    (p, o) => Some(p.unwrap_or(0) + o.unwrap_or(0)),
                },
            };
        }
        let cut = !ended
            || self.seen.incomplete
            // A stream whose format ends with a marker (`[DONE]`, `message_stop`,
            // `response.completed`) that never came. Gemini streams have none.
            || (self.framing == Framing::Sse && self.seen.expects_marker && !self.seen.complete)
            // A JSON body whose root never closed.
            || (self.framing == Framing::Json && self.bytes > 0 && !self.seen.any_document);
        let outcome = if status >= 400 || self.seen.error.is_some() {
            Outcome::UpstreamError
        } else if cut {
            Outcome::Truncated
        } else if self.seen.usage.is_empty() {
            Outcome::NoUsage
        } else {
            Outcome::Complete
        };
        if status >= 400 && self.seen.error.is_none() {
            self.seen.error = Some(format!("HTTP {status}"));
        }
        // An error body carries no model worth reporting.
        let model = if status >= 400 { None } else { self.seen.model };
        Extracted {
            usage: self.seen.usage,
            model,
            outcome,
            error: self.seen.error,
        }
    }
}

impl Seen {
    /// A document closed: what it says.
    fn document(&mut self, doc: Document<'_>) {
        self.any_document = true;
        let d = Doc::read(doc);
        let kind = d.kind.as_deref().unwrap_or_default();
        // Set once; every chunk of a stream would otherwise compare its `object` again.
        if !self.expects_marker
            && (is_text(d.object, "chat.completion.chunk")
                || kind.starts_with("message_")
                || kind.starts_with("content_block")
                || kind.starts_with("response."))
        {
            self.expects_marker = true;
        }
        if self.model.is_none()
            && let Some(m) = d
                .model
                .and_then(text)
                .or_else(|| d.nested_model.and_then(text))
            && !m.is_empty()
        {
            self.model = Some(m.into_owned());
        }
        if let Some(e) = d.error.or(d.nested_error)
            && let Ok(e) = serde_json::from_slice::<Value>(e)
            && !e.is_null()
        {
            self.error = Some(error_text(&e));
        }
        if kind == "error" && self.error.is_none() {
            self.error = Some("error event".to_owned());
        }
        match kind {
            "message_stop" | "response.completed" => self.complete = true,
            "response.incomplete" => self.incomplete = true,
            "response.failed" if self.error.is_none() => {
                self.error = Some("response.failed".to_owned());
            }
            _ => {}
        }
        // Gemini: cumulative, last wins.
        if let Some(m) = object_value(d.usage_metadata) {
            self.usage = gemini(&m);
            return;
        }
        // Anthropic: message_start sets, message_delta overrides field by field.
        let anthropic_usage = match kind {
            "message_start" => d.nested_usage,
            "message_delta" | "message" => d.usage,
            _ => None,
        };
        if let Some(u) = object_value(anthropic_usage) {
            let u = &u;
            let a = self.anthropic.get_or_insert_with(Anthropic::default);
            let set = |slot: &mut Option<u64>, v: Option<u64>| {
                if v.is_some() {
                    *slot = v;
                }
            };
            set(&mut a.input, get(u, &["input_tokens"]));
            set(
                &mut a.cache_creation,
                get(u, &["cache_creation_input_tokens"]),
            );
            set(&mut a.cache_read, get(u, &["cache_read_input_tokens"]));
            set(&mut a.output, get(u, &["output_tokens"]));
            set(
                &mut a.thinking,
                get(u, &["output_tokens_details", "thinking_tokens"]),
            );
            return;
        }
        // OpenAI Responses.
        let responses_usage = if kind.starts_with("response.") {
            d.nested_usage
        } else if opens_object(d.usage) && is_text(d.object, "response") {
            d.usage
        } else {
            None
        };
        if let Some(u) = object_value(responses_usage) {
            self.usage = responses(&u);
            return;
        }
        // OpenAI chat completions and embeddings (and compatible gateways).
        if let Some(u) = object_value(d.usage).filter(|u| u.get("prompt_tokens").is_some()) {
            self.usage = openai_chat(&u);
        }
    }
}

/// One document's captured values, raw: most documents of a stream carry `"usage": null` and the
/// same `object` and `model`, so strings are compared as bytes where they can be and decoded only
/// when needed, and only an object is parsed.
#[derive(Debug, Default)]
struct Doc<'a> {
    kind: Option<Cow<'a, str>>,
    object: Option<&'a [u8]>,
    model: Option<&'a [u8]>,
    usage: Option<&'a [u8]>,
    usage_metadata: Option<&'a [u8]>,
    error: Option<&'a [u8]>,
    nested_usage: Option<&'a [u8]>,
    nested_model: Option<&'a [u8]>,
    nested_error: Option<&'a [u8]>,
}

impl<'a> Doc<'a> {
    fn read(d: Document<'a>) -> Self {
        Self {
            kind: d.get(TYPE).and_then(text),
            object: d.get(OBJECT),
            model: d.get(MODEL),
            usage: d.get(USAGE),
            usage_metadata: d.get(USAGE_METADATA),
            error: d.get(ERROR),
            nested_usage: d.get(NESTED_USAGE),
            nested_model: d.get(NESTED_MODEL),
            nested_error: d.get(NESTED_ERROR),
        }
    }
}

/// Whether a captured value is the JSON string `s` (written plainly, or with escapes).
fn is_text(raw: Option<&[u8]>, s: &str) -> bool {
    let Some(raw) = raw else {
        return false;
    };
    match raw.strip_prefix(b"\"").and_then(|r| r.strip_suffix(b"\"")) {
        Some(inner) if inner == s.as_bytes() => true,
        Some(inner) if inner.contains(&b'\\') => text(raw).is_some_and(|t| t == s),
        _ => false,
    }
}

/// A captured JSON string's text; `None` for any other value. Without escapes it is the bytes
/// between the quotes, as they are.
fn text(raw: &[u8]) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if !inner.iter().any(|&b| b == b'\\' || b < 0x20) {
        return std::str::from_utf8(inner).ok().map(Cow::Borrowed);
    }
    serde_json::from_slice::<String>(raw).ok().map(Cow::Owned)
}

/// Whether a captured value begins as a JSON object (the test before any parse).
fn opens_object(raw: Option<&[u8]>) -> bool {
    raw.is_some_and(|r| r.first() == Some(&b'{'))
}

/// A captured value parsed, when it is a JSON object.
fn object_value(raw: Option<&[u8]>) -> Option<Value> {
    let raw = raw.filter(|r| opens_object(Some(r)))?;
    serde_json::from_slice::<Value>(raw)
        .ok()
        .filter(Value::is_object)
}

fn error_text(e: &Value) -> String {
    let text = e
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| e.get("type").and_then(Value::as_str))
        .or_else(|| e.as_str())
        .map_or_else(|| e.to_string(), str::to_owned);
    text.chars().take(512).collect()
}

/// Gemini `usageMetadata`: completion = candidates + thoughts.
fn gemini(m: &Value) -> TokenUsage {
    let candidates = get(m, &["candidatesTokenCount"]);
    let thoughts = get(m, &["thoughtsTokenCount"]);
    TokenUsage {
        prompt_tokens: get(m, &["promptTokenCount"]),
        completion_tokens: match (candidates, thoughts) {
            (None, None) => None,
            (c, t) => Some(c.unwrap_or(0) + t.unwrap_or(0)),
        },
        cached_input_tokens: get(m, &["cachedContentTokenCount"]),
        cache_creation_input_tokens: None,
        reasoning_tokens: thoughts,
        total_tokens: get(m, &["totalTokenCount"]),
    }
}

/// OpenAI Responses `usage`.
fn responses(u: &Value) -> TokenUsage {
    TokenUsage {
        prompt_tokens: get(u, &["input_tokens"]),
        completion_tokens: get(u, &["output_tokens"]),
        cached_input_tokens: get(u, &["input_tokens_details", "cached_tokens"]),
        cache_creation_input_tokens: None,
        reasoning_tokens: get(u, &["output_tokens_details", "reasoning_tokens"]),
        total_tokens: get(u, &["total_tokens"]),
    }
}

/// OpenAI chat completions / embeddings `usage`.
fn openai_chat(u: &Value) -> TokenUsage {
    TokenUsage {
        prompt_tokens: get(u, &["prompt_tokens"]),
        completion_tokens: get(u, &["completion_tokens"]),
        cached_input_tokens: get(u, &["prompt_tokens_details", "cached_tokens"]),
        cache_creation_input_tokens: get(u, &["prompt_tokens_details", "cache_write_tokens"]),
        reasoning_tokens: get(u, &["completion_tokens_details", "reasoning_tokens"]),
        total_tokens: get(u, &["total_tokens"]),
    }
}
