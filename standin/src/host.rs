//! A proxy-wasm host on wasmtime — test and dev tooling standing in for Envoy, which cannot run
//! here. It runs our usage reporter (Rust, `wasm32-wasip1`) and Higress's own Go plugins
//! (`wasip1` reactors exporting Higress's `proxy_abi_version_0_2_100` marker, 0.2.1 semantics).
//!
//! What it implements, to the 0.2.1 spec: header maps and property paths in their wire encodings,
//! buffers (request and response bodies, http-call answers, plugin configuration), memory handed
//! over through `proxy_on_memory_allocate`, `proxy_http_call` captured for the caller to dispatch
//! (see [`crate::gateway`]), local responses, `proxy_continue_stream`, shared data (per process, as
//! Envoy shares it per VM id), metrics, ticks, and the WASI preview1 calls Go's and Rust's runtimes
//! make (no files, no environment; stdout captured). Foreign functions answer `NotFound` (Higress's
//! plugins call `get_log_level` on every log line and fall back). Any other host call traps, so a
//! test fails loudly when a plugin starts using one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use sha2::{Digest, Sha256};
use wasmtime::{Caller, Engine, Extern, Instance, Linker, Module, Store};

/// A host failure: a trap, a missing export, a malformed module.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<wasmtime::Error> for Error {
    fn from(e: wasmtime::Error) -> Self {
        Self(format!("{e:?}"))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

// Status codes (proxy-wasm 0.2.1).
const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const BAD_ARGUMENT: i32 = 2;
const CAS_MISMATCH: i32 = 8;

/// Header map types.
pub const REQUEST_HEADERS: i32 = 0;
pub const RESPONSE_HEADERS: i32 = 2;
pub const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;

/// Buffer types.
pub const REQUEST_BODY: i32 = 0;
pub const RESPONSE_BODY: i32 = 1;
pub const HTTP_CALL_RESPONSE_BODY: i32 = 4;
pub const VM_CONFIGURATION: i32 = 6;
pub const PLUGIN_CONFIGURATION: i32 = 7;

/// The root context's id.
pub const ROOT: i32 = 1;

/// Header pairs in order, names lower-case.
pub type Headers = Vec<(String, String)>;

/// A captured `proxy_http_call`.
#[derive(Debug, Clone)]
pub struct HttpCall {
    /// The context that dispatched it (its response goes back there).
    pub context: i32,
    pub cluster: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
    pub token: u32,
}

impl HttpCall {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// The value of header `name` (lower-case) in `headers`.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A `proxy_send_local_response`.
#[derive(Debug, Clone)]
pub struct LocalResponse {
    pub context: i32,
    pub status: u16,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Headers,
}

/// A stream's filter state, shared by the VMs of every plugin on the stream: path → value.
pub type StreamState = Arc<Mutex<HashMap<String, Vec<u8>>>>;

/// Data shared by every VM of the process (`proxy_get/set_shared_data`): value and CAS.
pub type Shared = Arc<Mutex<HashMap<String, (Vec<u8>, u32)>>>;

#[derive(Debug, Default)]
pub struct State {
    pub plugin_config: Vec<u8>,
    pub request_headers: Headers,
    pub response_headers: Headers,
    /// The request body seen so far (Envoy's buffered body).
    pub request_body: Vec<u8>,
    /// The response body chunk of the current `on_response_body` call.
    pub response_chunk: Vec<u8>,
    pub call_response_headers: Headers,
    pub call_response_body: Vec<u8>,
    pub properties: HashMap<String, Vec<u8>>,
    /// What the plugin set with `proxy_set_property` during the current stream: Envoy keeps it
    /// as the stream's filter state (`wasm.<path>`), gone with the stream. Also in `properties`,
    /// where the plugin reads it back.
    pub filter_state: HashMap<String, Vec<u8>>,
    /// The stream's filter state as every plugin of the stream sees it (Envoy's is per stream,
    /// not per VM): what any plugin set, read by `proxy_get_property` when the VM's own
    /// properties do not have the path. Set by the gateway; none for a VM on its own.
    pub stream_state: Option<StreamState>,
    pub logs: Vec<(i32, String)>,
    pub calls: Vec<HttpCall>,
    pub metrics: Vec<(String, i64)>,
    pub now_ns: u64,
    pub stdout: Vec<u8>,
    /// Set by `proxy_set_effective_context` (the SDK does so before a callback's host calls).
    pub effective_context: i32,
    /// The context whose callback the host is running.
    pub current_context: i32,
    /// Set by `proxy_set_tick_period_milliseconds` (0: no timer).
    pub tick_period_ms: u32,
    /// Set when the plugin calls `proxy_done` (a root context that deferred its end is finished).
    pub done_called: bool,
    /// While set, `proxy_http_call` fails as Envoy does for an unknown cluster (`BadArgument`).
    pub refuse_calls: bool,
    /// Clusters `proxy_http_call` may name; `None`: any (Envoy answers `BadArgument` for others).
    pub known_clusters: Option<Vec<String>>,
    /// `proxy_send_local_response` calls, in order.
    pub local_responses: Vec<LocalResponse>,
    /// `(context, stream type)` of every `proxy_continue_stream`.
    pub continued: Vec<(i32, i32)>,
    pub shared: Shared,
    next_token: u32,
    random: u64,
    started: Option<Instant>,
}

/// Encodes a header map the way the 0.2.1 ABI passes it.
pub fn encode_map(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(len32(pairs.len()).to_le_bytes());
    for (k, v) in pairs {
        out.extend(len32(k.len()).to_le_bytes());
        out.extend(len32(v.len()).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend(k.as_bytes());
        out.push(0);
        out.extend(v.as_bytes());
        out.push(0);
    }
    out
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Decodes a header map in the 0.2.1 wire encoding; `None` when it is malformed.
pub fn decode_map(bytes: &[u8]) -> Option<Headers> {
    let u32_at = |i: usize| -> Option<usize> {
        let b = bytes.get(i..i + 4)?;
        Some(u32::from_le_bytes(b.try_into().ok()?) as usize)
    };
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let n = u32_at(0)?;
    let mut sizes = Vec::new();
    for i in 0..n {
        sizes.push((u32_at(4 + i * 8)?, u32_at(8 + i * 8)?));
    }
    let mut at = 4 + n * 8;
    let mut out = Vec::new();
    for (k, v) in sizes {
        let key = String::from_utf8_lossy(bytes.get(at..at + k)?).into_owned();
        at += k + 1;
        let value = String::from_utf8_lossy(bytes.get(at..at + v)?).into_owned();
        at += v + 1;
        out.push((key, value));
    }
    Some(out)
}

fn memory(caller: &mut Caller<'_, State>) -> wasmtime::Result<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(wasmtime::format_err!("module exports no memory")),
    }
}

// wasm32 passes pointers and sizes as i32 that are really u32: reinterpreting them is the ABI.
#[allow(clippy::cast_sign_loss)]
fn at(ptr: i32) -> usize {
    ptr as u32 as usize
}

fn read(caller: &mut Caller<'_, State>, ptr: i32, len: i32) -> wasmtime::Result<Vec<u8>> {
    let mem = memory(caller)?;
    let (ptr, len) = (at(ptr), at(len));
    mem.data(&caller)
        .get(ptr..ptr + len)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| wasmtime::format_err!("read out of bounds"))
}

fn read_str(caller: &mut Caller<'_, State>, ptr: i32, len: i32) -> wasmtime::Result<String> {
    Ok(String::from_utf8_lossy(&read(caller, ptr, len)?).into_owned())
}

fn write(caller: &mut Caller<'_, State>, ptr: i32, bytes: &[u8]) -> wasmtime::Result<()> {
    let mem = memory(caller)?;
    let ptr = at(ptr);
    mem.data_mut(caller)
        .get_mut(ptr..ptr + bytes.len())
        .ok_or_else(|| wasmtime::format_err!("write out of bounds"))?
        .copy_from_slice(bytes);
    Ok(())
}

/// Copies `bytes` into guest memory (allocated by the guest) and stores pointer and size at the
/// two return slots, as every "returns a buffer" host call does.
fn hand_over(
    caller: &mut Caller<'_, State>,
    bytes: &[u8],
    ret_ptr: i32,
    ret_size: i32,
) -> wasmtime::Result<i32> {
    let alloc = caller
        .get_export("proxy_on_memory_allocate")
        .and_then(Extern::into_func)
        .ok_or_else(|| wasmtime::format_err!("no proxy_on_memory_allocate"))?
        .typed::<i32, i32>(&caller)?;
    let len = i32::try_from(bytes.len())?;
    let ptr = alloc.call(&mut *caller, len)?;
    write(caller, ptr, bytes)?;
    write(caller, ret_ptr, &ptr.to_le_bytes())?;
    write(caller, ret_size, &len.to_le_bytes())?;
    Ok(OK)
}

fn map_of(state: &State, map_type: i32) -> Option<&Headers> {
    match map_type {
        REQUEST_HEADERS => Some(&state.request_headers),
        RESPONSE_HEADERS => Some(&state.response_headers),
        HTTP_CALL_RESPONSE_HEADERS => Some(&state.call_response_headers),
        _ => None,
    }
}

fn map_of_mut(state: &mut State, map_type: i32) -> Option<&mut Headers> {
    match map_type {
        REQUEST_HEADERS => Some(&mut state.request_headers),
        RESPONSE_HEADERS => Some(&mut state.response_headers),
        HTTP_CALL_RESPONSE_HEADERS => Some(&mut state.call_response_headers),
        _ => None,
    }
}

fn buffer_of_mut(state: &mut State, kind: i32) -> Option<&mut Vec<u8>> {
    match kind {
        REQUEST_BODY => Some(&mut state.request_body),
        RESPONSE_BODY => Some(&mut state.response_chunk),
        HTTP_CALL_RESPONSE_BODY => Some(&mut state.call_response_body),
        _ => None,
    }
}

// One list of host functions: splitting it would only scatter the ABI.
#[allow(clippy::too_many_lines)]
fn link_proxy(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: Caller<'_, State>, level: i32, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            let msg = read_str(&mut c, ptr, len)?;
            c.data_mut().logs.push((level, msg));
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: Caller<'_, State>, ret: i32| -> wasmtime::Result<i32> {
            // Debug: every log line reaches `logs`.
            write(&mut c, ret, &1i32.to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: Caller<'_, State>, ret: i32| -> wasmtime::Result<i32> {
            let now = c.data().now_ns;
            write(&mut c, ret, &now.to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, State>,
         kind: i32,
         start: i32,
         max: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> wasmtime::Result<i32> {
            let buf = match kind {
                PLUGIN_CONFIGURATION => c.data().plugin_config.clone(),
                VM_CONFIGURATION => Vec::new(),
                _ => match buffer_of_mut(c.data_mut(), kind) {
                    Some(b) => b.clone(),
                    None => return Ok(BAD_ARGUMENT),
                },
            };
            let start = at(start).min(buf.len());
            let end = start.saturating_add(at(max)).min(buf.len());
            if start == end {
                return Ok(NOT_FOUND);
            }
            hand_over(&mut c, &buf[start..end], ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: Caller<'_, State>,
         kind: i32,
         start: i32,
         length: i32,
         ptr: i32,
         size: i32|
         -> wasmtime::Result<i32> {
            let bytes = read(&mut c, ptr, size)?;
            let Some(buf) = buffer_of_mut(c.data_mut(), kind) else {
                return Ok(BAD_ARGUMENT);
            };
            // Envoy's rules: start 0 and length 0 prepends, start 0 and length ≥ size replaces,
            // start ≥ size appends; anything else is not supported.
            let (start, length) = (at(start), at(length));
            if start == 0 && length == 0 {
                buf.splice(0..0, bytes);
            } else if start == 0 && length >= buf.len() {
                *buf = bytes;
            } else if start >= buf.len() {
                buf.extend(bytes);
            } else {
                return Ok(BAD_ARGUMENT);
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, State>,
         map_type: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> wasmtime::Result<i32> {
            let Some(map) = map_of(c.data(), map_type) else {
                return Ok(BAD_ARGUMENT);
            };
            let bytes = encode_map(map);
            hand_over(&mut c, &bytes, ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: Caller<'_, State>, map_type: i32, ptr: i32, size: i32| -> wasmtime::Result<i32> {
            let Some(pairs) = decode_map(&read(&mut c, ptr, size)?) else {
                return Ok(BAD_ARGUMENT);
            };
            let Some(map) = map_of_mut(c.data_mut(), map_type) else {
                return Ok(BAD_ARGUMENT);
            };
            *map = pairs
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: Caller<'_, State>,
         map_type: i32,
         kp: i32,
         ks: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> wasmtime::Result<i32> {
            let key = read_str(&mut c, kp, ks)?.to_ascii_lowercase();
            let Some(map) = map_of(c.data(), map_type) else {
                return Ok(BAD_ARGUMENT);
            };
            let Some(value) = header(map, &key).map(str::to_owned) else {
                return Ok(NOT_FOUND);
            };
            hand_over(&mut c, value.as_bytes(), ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: Caller<'_, State>,
         map_type: i32,
         kp: i32,
         ks: i32,
         vp: i32,
         vs: i32|
         -> wasmtime::Result<i32> {
            let key = read_str(&mut c, kp, ks)?.to_ascii_lowercase();
            let value = read_str(&mut c, vp, vs)?;
            let Some(map) = map_of_mut(c.data_mut(), map_type) else {
                return Ok(BAD_ARGUMENT);
            };
            match map.iter().position(|(k, _)| *k == key) {
                Some(i) => {
                    map[i].1 = value;
                    let mut seen = false;
                    map.retain(|(k, _)| {
                        let keep = *k != key || !seen;
                        seen |= *k == key;
                        keep
                    });
                }
                None => map.push((key, value)),
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: Caller<'_, State>,
         map_type: i32,
         kp: i32,
         ks: i32,
         vp: i32,
         vs: i32|
         -> wasmtime::Result<i32> {
            let key = read_str(&mut c, kp, ks)?.to_ascii_lowercase();
            let value = read_str(&mut c, vp, vs)?;
            let Some(map) = map_of_mut(c.data_mut(), map_type) else {
                return Ok(BAD_ARGUMENT);
            };
            map.push((key, value));
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: Caller<'_, State>, map_type: i32, kp: i32, ks: i32| -> wasmtime::Result<i32> {
            let key = read_str(&mut c, kp, ks)?.to_ascii_lowercase();
            let Some(map) = map_of_mut(c.data_mut(), map_type) else {
                return Ok(BAD_ARGUMENT);
            };
            map.retain(|(k, _)| *k != key);
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: Caller<'_, State>,
         pp: i32,
         ps: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> wasmtime::Result<i32> {
            // Path segments are joined by NUL bytes.
            let path = read_str(&mut c, pp, ps)?
                .trim_end_matches('\0')
                .replace('\0', ".");
            let own = c.data().properties.get(&path).cloned();
            let shared = || {
                c.data()
                    .stream_state
                    .as_ref()
                    .and_then(|s| s.lock().ok()?.get(&path).cloned())
            };
            let Some(value) = own.or_else(shared) else {
                return Ok(NOT_FOUND);
            };
            hand_over(&mut c, &value, ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: Caller<'_, State>, pp: i32, ps: i32, vp: i32, vs: i32| -> wasmtime::Result<i32> {
            let path = read_str(&mut c, pp, ps)?
                .trim_end_matches('\0')
                .replace('\0', ".");
            let value = read(&mut c, vp, vs)?;
            if let Some(shared) = &c.data().stream_state
                && let Ok(mut m) = shared.lock()
            {
                m.insert(path.clone(), value.clone());
            }
            c.data_mut()
                .filter_state
                .insert(path.clone(), value.clone());
            c.data_mut().properties.insert(path, value);
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: Caller<'_, State>,
         up: i32,
         us: i32,
         hp: i32,
         hs: i32,
         bp: i32,
         bs: i32,
         tp: i32,
         ts: i32,
         timeout: i32,
         ret_token: i32|
         -> wasmtime::Result<i32> {
            let cluster = read_str(&mut c, up, us)?;
            let Some(headers) = decode_map(&read(&mut c, hp, hs)?) else {
                return Ok(BAD_ARGUMENT);
            };
            let body = read(&mut c, bp, bs)?;
            let trailers = decode_map(&read(&mut c, tp, ts)?).unwrap_or_default();
            let known = c
                .data()
                .known_clusters
                .as_ref()
                .is_none_or(|k| k.contains(&cluster));
            // What Envoy answers for a cluster it does not know (e.g. one not pushed to it), and
            // for a call without the pseudo-headers it needs.
            if c.data().refuse_calls
                || !known
                || !trailers.is_empty()
                || header(&headers, ":path").is_none()
            {
                return Ok(BAD_ARGUMENT);
            }
            let token = c.data().next_token + 1;
            c.data_mut().next_token = token;
            let context = c.data().current_context;
            c.data_mut().calls.push(HttpCall {
                context,
                cluster,
                headers,
                body,
                #[allow(clippy::cast_sign_loss)]
                timeout_ms: timeout as u32,
                token,
            });
            write(&mut c, ret_token, &token.to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: Caller<'_, State>,
         status: i32,
         dp: i32,
         ds: i32,
         bp: i32,
         bs: i32,
         hp: i32,
         hs: i32,
         _grpc: i32|
         -> wasmtime::Result<i32> {
            let details = read_str(&mut c, dp, ds)?;
            let body = read(&mut c, bp, bs)?;
            let headers = decode_map(&read(&mut c, hp, hs)?).unwrap_or_default();
            let context = c.data().current_context;
            c.data_mut().local_responses.push(LocalResponse {
                context,
                status: u16::try_from(status).unwrap_or(500),
                details,
                body,
                headers,
            });
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: Caller<'_, State>, stream: i32| -> i32 {
            let context = c.data().current_context;
            c.data_mut().continued.push((context, stream));
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: Caller<'_, State>,
         kp: i32,
         ks: i32,
         ret_ptr: i32,
         ret_size: i32,
         ret_cas: i32|
         -> wasmtime::Result<i32> {
            let key = read_str(&mut c, kp, ks)?;
            let found = c
                .data()
                .shared
                .lock()
                .map_err(|_| wasmtime::format_err!("shared data poisoned"))?
                .get(&key)
                .cloned();
            let Some((value, cas)) = found else {
                return Ok(NOT_FOUND);
            };
            hand_over(&mut c, &value, ret_ptr, ret_size)?;
            write(&mut c, ret_cas, &cas.to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: Caller<'_, State>,
         kp: i32,
         ks: i32,
         vp: i32,
         vs: i32,
         cas: i32|
         -> wasmtime::Result<i32> {
            let key = read_str(&mut c, kp, ks)?;
            let value = read(&mut c, vp, vs)?;
            let shared = c.data().shared.clone();
            let mut shared = shared
                .lock()
                .map_err(|_| wasmtime::format_err!("shared data poisoned"))?;
            let current = shared.get(&key).map_or(0, |(_, n)| *n);
            #[allow(clippy::cast_sign_loss)]
            let cas = cas as u32;
            if cas != 0 && cas != current {
                return Ok(CAS_MISMATCH);
            }
            shared.insert(key, (value, current + 1));
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |_c: Caller<'_, State>,
         _np: i32,
         _ns: i32,
         _ap: i32,
         _as: i32,
         _rp: i32,
         _rs: i32|
         -> i32 { NOT_FOUND },
    )?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Caller<'_, State>,
         _kind: i32,
         np: i32,
         ns: i32,
         ret_id: i32|
         -> wasmtime::Result<i32> {
            let name = read_str(&mut c, np, ns)?;
            let metrics = &mut c.data_mut().metrics;
            let id = if let Some(i) = metrics.iter().position(|(n, _)| *n == name) {
                i
            } else {
                metrics.push((name, 0));
                metrics.len() - 1
            };
            write(&mut c, ret_id, &len32(id).to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: Caller<'_, State>, id: i32, offset: i64| -> i32 {
            match c.data_mut().metrics.get_mut(at(id)) {
                Some(m) => {
                    m.1 += offset;
                    OK
                }
                None => NOT_FOUND,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |mut c: Caller<'_, State>, id: i32, value: i64| -> i32 {
            match c.data_mut().metrics.get_mut(at(id)) {
                Some(m) => {
                    m.1 = value;
                    OK
                }
                None => NOT_FOUND,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: Caller<'_, State>, id: i32, ret: i32| -> wasmtime::Result<i32> {
            let Some(v) = c.data().metrics.get(at(id)).map(|m| m.1) else {
                return Ok(NOT_FOUND);
            };
            write(&mut c, ret, &v.to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap("env", "proxy_done", |mut c: Caller<'_, State>| -> i32 {
        c.data_mut().done_called = true;
        OK
    })?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: Caller<'_, State>, period: i32| -> i32 {
            #[allow(clippy::cast_sign_loss)]
            let period = period as u32;
            c.data_mut().tick_period_ms = period;
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: Caller<'_, State>, id: i32| -> i32 {
            c.data_mut().effective_context = id;
            OK
        },
    )?;
    Ok(())
}

// WASI preview1 errno values.
const ESUCCESS: i32 = 0;
const EBADF: i32 = 8;
const ENOSYS: i32 = 52;

/// The WASI preview1 calls Go's `wasip1` runtime and Rust's std make: no files (preopens answer
/// `EBADF`), no arguments or environment, stdout and stderr captured, clocks from the host.
#[allow(clippy::too_many_lines)]
fn link_wasi(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    const W: &str = "wasi_snapshot_preview1";
    let empty = |mut c: Caller<'_, State>, count: i32, size: i32| -> wasmtime::Result<i32> {
        write(&mut c, count, &0u32.to_le_bytes())?;
        write(&mut c, size, &0u32.to_le_bytes())?;
        Ok(ESUCCESS)
    };
    linker.func_wrap(W, "environ_sizes_get", empty)?;
    linker.func_wrap(W, "args_sizes_get", empty)?;
    linker.func_wrap(
        W,
        "environ_get",
        |_c: Caller<'_, State>, _a: i32, _b: i32| ESUCCESS,
    )?;
    linker.func_wrap(W, "args_get", |_c: Caller<'_, State>, _a: i32, _b: i32| {
        ESUCCESS
    })?;
    linker.func_wrap(
        W,
        "fd_write",
        |mut c: Caller<'_, State>, fd: i32, iovs: i32, n: i32, written: i32| {
            if !(1..=2).contains(&fd) {
                return Ok(EBADF);
            }
            let mut total = 0u32;
            for i in 0..n {
                let iov = read(&mut c, iovs + i * 8, 8)?;
                let ptr = i32::from_le_bytes(iov[0..4].try_into()?);
                let len = i32::from_le_bytes(iov[4..8].try_into()?);
                let bytes = read(&mut c, ptr, len)?;
                total += len32(bytes.len());
                c.data_mut().stdout.extend(bytes);
            }
            write(&mut c, written, &total.to_le_bytes())?;
            wasmtime::Result::<i32>::Ok(ESUCCESS)
        },
    )?;
    linker.func_wrap(
        W,
        "fd_read",
        |_c: Caller<'_, State>, _fd: i32, _iovs: i32, _n: i32, _read: i32| EBADF,
    )?;
    linker.func_wrap(W, "fd_close", |_c: Caller<'_, State>, _fd: i32| EBADF)?;
    linker.func_wrap(
        W,
        "fd_fdstat_get",
        |mut c: Caller<'_, State>, fd: i32, ret: i32| -> wasmtime::Result<i32> {
            if !(0..=2).contains(&fd) {
                return Ok(EBADF);
            }
            // filetype character device, no flags, all rights.
            let mut stat = [0u8; 24];
            stat[0] = 2;
            stat[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
            stat[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
            write(&mut c, ret, &stat)?;
            Ok(ESUCCESS)
        },
    )?;
    linker.func_wrap(
        W,
        "fd_fdstat_set_flags",
        |_c: Caller<'_, State>, _fd: i32, _flags: i32| ESUCCESS,
    )?;
    linker.func_wrap(
        W,
        "fd_prestat_get",
        |_c: Caller<'_, State>, _fd: i32, _r: i32| EBADF,
    )?;
    linker.func_wrap(
        W,
        "fd_prestat_dir_name",
        |_c: Caller<'_, State>, _fd: i32, _p: i32, _l: i32| EBADF,
    )?;
    linker.func_wrap(
        W,
        "path_open",
        |_c: Caller<'_, State>,
         _fd: i32,
         _dirflags: i32,
         _p: i32,
         _l: i32,
         _oflags: i32,
         _rb: i64,
         _ri: i64,
         _fdflags: i32,
         _ret: i32| EBADF,
    )?;
    linker.func_wrap(W, "sched_yield", |_c: Caller<'_, State>| ESUCCESS)?;
    linker.func_wrap(
        W,
        "clock_time_get",
        |mut c: Caller<'_, State>, id: i32, _precision: i64, ret: i32| -> wasmtime::Result<i32> {
            let now = if id == 0 {
                c.data().now_ns
            } else {
                // Monotonic: real elapsed time, so Go's scheduler sees time pass.
                let started = *c.data_mut().started.get_or_insert_with(Instant::now);
                u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
            };
            write(&mut c, ret, &now.to_le_bytes())?;
            Ok(ESUCCESS)
        },
    )?;
    linker.func_wrap(
        W,
        "clock_res_get",
        |mut c: Caller<'_, State>, _id: i32, ret: i32| -> wasmtime::Result<i32> {
            write(&mut c, ret, &1u64.to_le_bytes())?;
            Ok(ESUCCESS)
        },
    )?;
    linker.func_wrap(
        W,
        "random_get",
        |mut c: Caller<'_, State>, buf: i32, len: i32| -> wasmtime::Result<i32> {
            // xorshift64*: test tooling needs varied bytes, not secret ones.
            let mut out = Vec::with_capacity(at(len));
            let mut x = c.data().random | 1;
            while out.len() < at(len) {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                out.extend(x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
            }
            out.truncate(at(len));
            c.data_mut().random = x;
            write(&mut c, buf, &out)?;
            Ok(ESUCCESS)
        },
    )?;
    linker.func_wrap(
        W,
        "poll_oneoff",
        |mut c: Caller<'_, State>, subs: i32, events: i32, n: i32, ret: i32| {
            // Every subscription fires at once (a reactor only sleeps inside a callback).
            for i in 0..n {
                let sub = read(&mut c, subs + i * 48, 48)?;
                let mut event = [0u8; 32];
                event[0..8].copy_from_slice(&sub[0..8]);
                event[10] = sub[8];
                write(&mut c, events + i * 32, &event)?;
            }
            write(&mut c, ret, &n.to_le_bytes())?;
            wasmtime::Result::<i32>::Ok(ESUCCESS)
        },
    )?;
    linker.func_wrap(
        W,
        "proc_exit",
        |_c: Caller<'_, State>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::format_err!("proc_exit({code})"))
        },
    )?;
    linker.func_wrap(W, "fd_sync", |_c: Caller<'_, State>, _fd: i32| ENOSYS)?;
    Ok(())
}

/// The process's engine: one, so a module compiles once and serves every VM.
fn engine(fuel: bool) -> Result<&'static Engine> {
    static PLAIN: OnceLock<std::result::Result<Engine, String>> = OnceLock::new();
    static FUEL: OnceLock<std::result::Result<Engine, String>> = OnceLock::new();
    let cell = if fuel { &FUEL } else { &PLAIN };
    cell.get_or_init(|| {
        let mut config = wasmtime::Config::new();
        config.consume_fuel(fuel);
        Engine::new(&config).map_err(|e| format!("{e:?}"))
    })
    .as_ref()
    .map_err(|e| Error(e.clone()))
}

/// A compiled module, cached per process by content hash and engine (compiling ai-proxy takes
/// seconds: once per test binary, instantiated per VM).
pub fn compile(wasm: &[u8], fuel: bool) -> Result<Module> {
    type Cache = Mutex<HashMap<(String, bool), Module>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key = (hex::encode(Sha256::digest(wasm)), fuel);
    let cache = CACHE.get_or_init(Cache::default);
    if let Some(m) = cache
        .lock()
        .map_err(|_| Error("poisoned".into()))?
        .get(&key)
    {
        return Ok(m.clone());
    }
    let module = Module::new(engine(fuel)?, wasm)?;
    cache
        .lock()
        .map_err(|_| Error("poisoned".into()))?
        .insert(key, module.clone());
    Ok(module)
}

/// One loaded plugin: a VM with its root context ([`ROOT`]).
pub struct Host {
    pub store: Store<State>,
    instance: Instance,
    next_context: i32,
    /// What `proxy_on_configure` answered.
    pub configured: bool,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("configured", &self.configured)
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Loads the module and configures the root context with `config`; returns the host and what
    /// `proxy_on_configure` answered.
    pub fn load(wasm: &[u8], config: &[u8]) -> Result<(Self, bool)> {
        Self::start(wasm, config, false, Shared::default())
    }

    /// With `fuel`, every executed wasm instruction costs one unit of fuel ([`Host::fuel_used`]);
    /// `shared` is the process's shared data.
    pub fn start(wasm: &[u8], config: &[u8], fuel: bool, shared: Shared) -> Result<(Self, bool)> {
        let module = compile(wasm, fuel)?;
        let engine = module.engine();
        let mut linker = Linker::new(engine);
        link_proxy(&mut linker)?;
        link_wasi(&mut linker)?;
        linker.define_unknown_imports_as_traps(&module)?;
        let mut store = Store::new(
            engine,
            State {
                plugin_config: config.to_vec(),
                now_ns: 1_790_000_000_000_000_000,
                random: 0x9E37_79B9_7F4A_7C15,
                shared,
                ..State::default()
            },
        );
        if fuel {
            store.set_fuel(u64::MAX)?;
        }
        let instance = linker.instantiate(&mut store, &module)?;
        let mut host = Self {
            store,
            instance,
            next_context: ROOT + 1,
            configured: false,
        };
        host.call::<(), ()>("_initialize", ())?;
        host.state().current_context = ROOT;
        host.call::<(i32, i32), ()>("proxy_on_context_create", (ROOT, 0))?;
        if host.call::<(i32, i32), i32>("proxy_on_vm_start", (ROOT, 0))? != 1 {
            return Err(Error(format!(
                "proxy_on_vm_start refused; logs: {:?}",
                host.state().logs
            )));
        }
        let len = i32::try_from(config.len()).map_err(|e| Error(e.to_string()))?;
        host.configured = host.call::<(i32, i32), i32>("proxy_on_configure", (ROOT, len))? == 1;
        let ok = host.configured;
        Ok((host, ok))
    }

    /// Calls an export; a trap is an error carrying the plugin's logs.
    pub fn call<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
        &mut self,
        name: &str,
        params: P,
    ) -> Result<R> {
        let f = self
            .instance
            .get_typed_func::<P, R>(&mut self.store, name)
            .map_err(|e| Error(format!("{name}: {e}")))?;
        f.call(&mut self.store, params).map_err(|e| {
            Error(format!(
                "{name} trapped: {e:?}\nlogs: {:?}\nstdout: {}",
                self.store.data().logs,
                String::from_utf8_lossy(&self.store.data().stdout)
            ))
        })
    }

    pub fn state(&mut self) -> &mut State {
        self.store.data_mut()
    }

    /// Creates an HTTP context; returns its id.
    pub fn create_http(&mut self) -> Result<i32> {
        let id = self.next_context;
        self.next_context += 1;
        self.state().current_context = id;
        self.call::<(i32, i32), ()>("proxy_on_context_create", (id, ROOT))?;
        Ok(id)
    }

    fn count(headers: &[(String, String)]) -> i32 {
        i32::try_from(headers.len()).unwrap_or(i32::MAX)
    }

    /// `proxy_on_request_headers` on the current request headers; returns the action.
    pub fn on_request_headers(&mut self, id: i32, end: bool) -> Result<i32> {
        self.state().current_context = id;
        let n = Self::count(&self.state().request_headers);
        self.call("proxy_on_request_headers", (id, n, i32::from(end)))
    }

    /// `proxy_on_request_body` on the current request body; returns the action.
    pub fn on_request_body(&mut self, id: i32, end: bool) -> Result<i32> {
        self.state().current_context = id;
        let n = i32::try_from(self.state().request_body.len()).unwrap_or(i32::MAX);
        self.call("proxy_on_request_body", (id, n, i32::from(end)))
    }

    /// `proxy_on_response_headers` on the current response headers; returns the action.
    pub fn on_response_headers(&mut self, id: i32, end: bool) -> Result<i32> {
        self.state().current_context = id;
        let n = Self::count(&self.state().response_headers);
        self.call("proxy_on_response_headers", (id, n, i32::from(end)))
    }

    /// `proxy_on_response_body` on the current chunk; returns the action.
    pub fn on_response_body(&mut self, id: i32, end: bool) -> Result<i32> {
        self.state().current_context = id;
        let n = i32::try_from(self.state().response_chunk.len()).unwrap_or(i32::MAX);
        self.call("proxy_on_response_body", (id, n, i32::from(end)))
    }

    /// The end of a stream as Envoy runs it: log, done, delete.
    pub fn end_stream(&mut self, id: i32) -> Result<()> {
        self.state().current_context = id;
        self.call::<i32, ()>("proxy_on_log", id)?;
        self.call::<i32, i32>("proxy_on_done", id)?;
        self.call::<i32, ()>("proxy_on_delete", id)
    }

    /// Envoy retiring the root context (`proxy_on_done`); true when it is done at once.
    pub fn retire(&mut self) -> Result<bool> {
        self.state().current_context = ROOT;
        Ok(self.call::<i32, i32>("proxy_on_done", ROOT)? == 1)
    }

    /// Fires the root context's timer (`proxy_on_tick`).
    pub fn on_tick(&mut self) -> Result<()> {
        self.state().current_context = ROOT;
        self.call::<i32, ()>("proxy_on_tick", ROOT)
    }

    /// Delivers the answer to an http call: headers (with `:status`) and body.
    pub fn deliver(&mut self, id: i32, token: u32, headers: Headers, body: Vec<u8>) -> Result<()> {
        self.state().current_context = id;
        let n = Self::count(&headers);
        let size = i32::try_from(body.len()).unwrap_or(i32::MAX);
        self.state().call_response_headers = headers;
        self.state().call_response_body = body;
        let token = i32::try_from(token).map_err(|e| Error(e.to_string()))?;
        self.call::<(i32, i32, i32, i32, i32), ()>(
            "proxy_on_http_call_response",
            (id, token, n, size, 0),
        )
    }

    /// Fuel consumed so far (with [`Host::start`] and `fuel`).
    pub fn fuel_used(&self) -> u64 {
        u64::MAX - self.store.get_fuel().unwrap_or(u64::MAX)
    }

    pub fn advance_ms(&mut self, ms: u64) {
        self.state().now_ns += ms * 1_000_000;
    }

    pub fn metric(&mut self, name: &str) -> Option<i64> {
        self.state()
            .metrics
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }
}
