//! A proxy-wasm 0.2.1 host on wasmtime, for tests only — a fixture, not a product.
//!
//! It stands in for Envoy (which cannot run here): it loads the real `.wasm`, drives it through the
//! ABI (`_initialize`, context create, `on_vm_start`, `on_configure`, request/response headers,
//! response body chunks, `on_log`, `on_done`, `on_delete`) and implements the host calls the plugin
//! makes, faithfully to the 0.2.1 spec: header maps and property paths in their wire encodings,
//! memory handed over through `proxy_on_memory_allocate`, `proxy_http_call` captured instead of
//! sent. Any other host call traps, so a test fails loudly if the plugin starts using one.

// Test fixture: panics are test failures. wasm32 passes pointers and sizes as i32 that are really
// u32, so reinterpreting casts are the ABI, not accidents. `link` is one list of host functions.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_sign_loss,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::too_many_lines,
    clippy::too_many_arguments
)]

use std::collections::HashMap;

use wasmtime::{Caller, Engine, Extern, Instance, Linker, Module, Store};

// Status codes (proxy-wasm 0.2.1).
const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const BAD_ARGUMENT: i32 = 2;

// Map types.
const REQUEST_HEADERS: i32 = 0;
const RESPONSE_HEADERS: i32 = 2;
const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;

// Buffer types.
const RESPONSE_BODY: i32 = 1;
const HTTP_CALL_RESPONSE_BODY: i32 = 4;
const VM_CONFIGURATION: i32 = 6;
const PLUGIN_CONFIGURATION: i32 = 7;

/// A captured `proxy_http_call`.
#[derive(Debug, Clone)]
pub struct HttpCall {
    /// The context that dispatched it (its response goes back there).
    pub context: i32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
    pub token: u32,
}

impl HttpCall {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub plugin_config: Vec<u8>,
    pub request_headers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
    /// The body chunk of the current `on_response_body` call.
    pub response_chunk: Vec<u8>,
    pub call_response_headers: Vec<(String, String)>,
    pub properties: HashMap<String, Vec<u8>>,
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
    next_token: u32,
}

/// Encodes a header map the way the 0.2.1 ABI passes it.
pub fn encode_map(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(u32::try_from(pairs.len()).unwrap().to_le_bytes());
    for (k, v) in pairs {
        out.extend(u32::try_from(k.len()).unwrap().to_le_bytes());
        out.extend(u32::try_from(v.len()).unwrap().to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend(k.as_bytes());
        out.push(0);
        out.extend(v.as_bytes());
        out.push(0);
    }
    out
}

/// Decodes a header map in the 0.2.1 wire encoding.
pub fn decode_map(bytes: &[u8]) -> Vec<(String, String)> {
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap()) as usize;
    let n = u32_at(0);
    let mut sizes = Vec::new();
    for i in 0..n {
        sizes.push((u32_at(4 + i * 8), u32_at(8 + i * 8)));
    }
    let mut at = 4 + n * 8;
    let mut out = Vec::new();
    for (k, v) in sizes {
        let key = String::from_utf8_lossy(&bytes[at..at + k]).into_owned();
        at += k + 1;
        let value = String::from_utf8_lossy(&bytes[at..at + v]).into_owned();
        at += v + 1;
        out.push((key, value));
    }
    out
}

fn memory(caller: &mut Caller<'_, State>) -> wasmtime::Memory {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => m,
        _ => panic!("module exports no memory"),
    }
}

fn read(caller: &mut Caller<'_, State>, ptr: i32, len: i32) -> Vec<u8> {
    let mem = memory(caller);
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    mem.data(&caller)[ptr..ptr + len].to_vec()
}

fn write(caller: &mut Caller<'_, State>, ptr: i32, bytes: &[u8]) {
    let mem = memory(caller);
    let ptr = ptr as u32 as usize;
    mem.data_mut(caller)[ptr..ptr + bytes.len()].copy_from_slice(bytes);
}

/// Copies `bytes` into guest memory (allocated by the guest) and stores pointer and size at the
/// two return slots, as every "returns a buffer" host call does.
fn hand_over(caller: &mut Caller<'_, State>, bytes: &[u8], ret_ptr: i32, ret_size: i32) -> i32 {
    let alloc = caller
        .get_export("proxy_on_memory_allocate")
        .and_then(Extern::into_func)
        .expect("proxy_on_memory_allocate")
        .typed::<i32, i32>(&caller)
        .expect("allocator signature");
    let len = i32::try_from(bytes.len()).unwrap();
    let ptr = alloc.call(&mut *caller, len).expect("allocate");
    write(caller, ptr, bytes);
    write(caller, ret_ptr, &ptr.to_le_bytes());
    write(caller, ret_size, &len.to_le_bytes());
    OK
}

fn map_of(state: &State, map_type: i32) -> Option<&Vec<(String, String)>> {
    match map_type {
        REQUEST_HEADERS => Some(&state.request_headers),
        RESPONSE_HEADERS => Some(&state.response_headers),
        HTTP_CALL_RESPONSE_HEADERS => Some(&state.call_response_headers),
        _ => None,
    }
}

fn map_of_mut(state: &mut State, map_type: i32) -> Option<&mut Vec<(String, String)>> {
    match map_type {
        REQUEST_HEADERS => Some(&mut state.request_headers),
        RESPONSE_HEADERS => Some(&mut state.response_headers),
        HTTP_CALL_RESPONSE_HEADERS => Some(&mut state.call_response_headers),
        _ => None,
    }
}

fn link(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: Caller<'_, State>, level: i32, ptr: i32, len: i32| -> i32 {
            let msg = String::from_utf8_lossy(&read(&mut c, ptr, len)).into_owned();
            c.data_mut().logs.push((level, msg));
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: Caller<'_, State>, ret: i32| -> i32 {
            let now = c.data().now_ns;
            write(&mut c, ret, &now.to_le_bytes());
            OK
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
         -> i32 {
            let buf = match kind {
                RESPONSE_BODY => c.data().response_chunk.clone(),
                PLUGIN_CONFIGURATION => c.data().plugin_config.clone(),
                VM_CONFIGURATION | HTTP_CALL_RESPONSE_BODY => Vec::new(),
                _ => return BAD_ARGUMENT,
            };
            let start = (start as u32 as usize).min(buf.len());
            let end = start.saturating_add(max as u32 as usize).min(buf.len());
            if start == end {
                return NOT_FOUND;
            }
            hand_over(&mut c, &buf[start..end], ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, State>, map_type: i32, ret_ptr: i32, ret_size: i32| -> i32 {
            let Some(map) = map_of(c.data(), map_type) else {
                return BAD_ARGUMENT;
            };
            let bytes = encode_map(map);
            hand_over(&mut c, &bytes, ret_ptr, ret_size)
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
         -> i32 {
            let key = String::from_utf8_lossy(&read(&mut c, kp, ks)).to_ascii_lowercase();
            let Some(map) = map_of(c.data(), map_type) else {
                return BAD_ARGUMENT;
            };
            let Some(value) = map.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()) else {
                return NOT_FOUND;
            };
            hand_over(&mut c, value.as_bytes(), ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: Caller<'_, State>, map_type: i32, kp: i32, ks: i32, vp: i32, vs: i32| -> i32 {
            let key = String::from_utf8_lossy(&read(&mut c, kp, ks)).to_ascii_lowercase();
            let value = String::from_utf8_lossy(&read(&mut c, vp, vs)).into_owned();
            let Some(map) = map_of_mut(c.data_mut(), map_type) else {
                return BAD_ARGUMENT;
            };
            map.retain(|(k, _)| *k != key);
            map.push((key, value));
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: Caller<'_, State>, map_type: i32, kp: i32, ks: i32| -> i32 {
            let key = String::from_utf8_lossy(&read(&mut c, kp, ks)).to_ascii_lowercase();
            let Some(map) = map_of_mut(c.data_mut(), map_type) else {
                return BAD_ARGUMENT;
            };
            map.retain(|(k, _)| *k != key);
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: Caller<'_, State>, pp: i32, ps: i32, ret_ptr: i32, ret_size: i32| -> i32 {
            // Path segments are joined by NUL bytes.
            let path = String::from_utf8_lossy(&read(&mut c, pp, ps)).replace('\0', ".");
            let Some(value) = c.data().properties.get(&path).cloned() else {
                return NOT_FOUND;
            };
            hand_over(&mut c, &value, ret_ptr, ret_size)
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
         -> i32 {
            let cluster = String::from_utf8_lossy(&read(&mut c, up, us)).into_owned();
            let headers = decode_map(&read(&mut c, hp, hs));
            let body = read(&mut c, bp, bs);
            let trailers = read(&mut c, tp, ts);
            assert!(trailers.is_empty() || decode_map(&trailers).is_empty());
            if c.data().refuse_calls {
                // What Envoy answers for a cluster it does not know (e.g. one not pushed to it).
                return BAD_ARGUMENT;
            }
            let token = c.data().next_token + 1;
            c.data_mut().next_token = token;
            let context = c.data().current_context;
            c.data_mut().calls.push(HttpCall {
                context,
                cluster,
                headers,
                body,
                timeout_ms: timeout as u32,
                token,
            });
            write(&mut c, ret_token, &token.to_le_bytes());
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Caller<'_, State>, _kind: i32, np: i32, ns: i32, ret_id: i32| -> i32 {
            let name = String::from_utf8_lossy(&read(&mut c, np, ns)).into_owned();
            let id = u32::try_from(c.data().metrics.len()).unwrap();
            c.data_mut().metrics.push((name, 0));
            write(&mut c, ret_id, &id.to_le_bytes());
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: Caller<'_, State>, id: i32, offset: i64| -> i32 {
            match c.data_mut().metrics.get_mut(id as u32 as usize) {
                Some(m) => {
                    m.1 += offset;
                    OK
                }
                None => NOT_FOUND,
            }
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
            c.data_mut().tick_period_ms = period as u32;
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
    // The WASI functions Rust's std links for wasm32-wasip1: no environment, stdout captured.
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "environ_sizes_get",
        |mut c: Caller<'_, State>, count: i32, size: i32| -> i32 {
            write(&mut c, count, &0u32.to_le_bytes());
            write(&mut c, size, &0u32.to_le_bytes());
            0
        },
    )?;
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "environ_get",
        |_c: Caller<'_, State>, _environ: i32, _buf: i32| -> i32 { 0 },
    )?;
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "fd_write",
        |mut c: Caller<'_, State>, _fd: i32, iovs: i32, n: i32, written: i32| -> i32 {
            let mut total = 0u32;
            for i in 0..n {
                let iov = read(&mut c, iovs + i * 8, 8);
                let ptr = i32::from_le_bytes(iov[0..4].try_into().unwrap());
                let len = i32::from_le_bytes(iov[4..8].try_into().unwrap());
                let bytes = read(&mut c, ptr, len);
                c.data_mut().stdout.extend(bytes);
                total += len as u32;
            }
            write(&mut c, written, &total.to_le_bytes());
            0
        },
    )?;
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "proc_exit",
        |_c: Caller<'_, State>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::format_err!("proc_exit({code})"))
        },
    )?;
    Ok(())
}

/// One loaded plugin: a VM with its root context (id 1).
pub struct Host {
    pub store: Store<State>,
    instance: Instance,
    next_context: i32,
}

pub const ROOT: i32 = 1;

impl Host {
    /// Loads the module and configures the root context with `config`; returns the host and what
    /// `proxy_on_configure` answered.
    pub fn load(wasm: &[u8], config: &[u8]) -> (Self, bool) {
        Self::load_with(wasm, config, false)
    }

    /// With `fuel`, every executed wasm instruction costs one unit of fuel ([`Host::fuel_used`]).
    pub fn load_with(wasm: &[u8], config: &[u8], fuel: bool) -> (Self, bool) {
        let mut engine_config = wasmtime::Config::new();
        engine_config.consume_fuel(fuel);
        let engine = Engine::new(&engine_config).unwrap();
        let module = Module::new(&engine, wasm).unwrap();
        let mut linker = Linker::new(&engine);
        link(&mut linker).unwrap();
        linker.define_unknown_imports_as_traps(&module).unwrap();
        let mut store = Store::new(
            &engine,
            State {
                plugin_config: config.to_vec(),
                now_ns: 1_790_000_000_000_000_000,
                ..State::default()
            },
        );
        if fuel {
            store.set_fuel(u64::MAX).unwrap();
        }
        let instance = linker.instantiate(&mut store, &module).unwrap();
        let mut host = Self {
            store,
            instance,
            next_context: ROOT + 1,
        };
        host.call::<(), ()>("_initialize", ());
        host.call::<(i32, i32), ()>("proxy_on_context_create", (ROOT, 0));
        assert_eq!(
            host.call::<(i32, i32), i32>("proxy_on_vm_start", (ROOT, 0)),
            1
        );
        let len = i32::try_from(config.len()).unwrap();
        let ok = host.call::<(i32, i32), i32>("proxy_on_configure", (ROOT, len)) == 1;
        (host, ok)
    }

    pub fn call<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
        &mut self,
        name: &str,
        params: P,
    ) -> R {
        let f = self
            .instance
            .get_typed_func::<P, R>(&mut self.store, name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        f.call(&mut self.store, params)
            .unwrap_or_else(|e| panic!("{name} trapped: {e:?}\nlogs: {:?}", self.store.data().logs))
    }

    pub fn state(&mut self) -> &mut State {
        self.store.data_mut()
    }

    /// Creates an HTTP context; returns its id.
    pub fn new_http(&mut self) -> i32 {
        let id = self.next_context;
        self.next_context += 1;
        self.call::<(i32, i32), ()>("proxy_on_context_create", (id, ROOT));
        id
    }

    pub fn request_headers(&mut self, id: i32, headers: &[(&str, &str)], end: bool) -> i32 {
        // The context whose callback runs (Envoy tracks it for http calls made from it).
        self.state().current_context = id;
        self.state().request_headers = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let n = i32::try_from(headers.len()).unwrap();
        self.call::<(i32, i32, i32), i32>("proxy_on_request_headers", (id, n, i32::from(end)))
    }

    pub fn response_headers(&mut self, id: i32, headers: &[(&str, &str)], end: bool) -> i32 {
        // The context whose callback runs (Envoy tracks it for http calls made from it).
        self.state().current_context = id;
        self.state().response_headers = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let n = i32::try_from(headers.len()).unwrap();
        self.call::<(i32, i32, i32), i32>("proxy_on_response_headers", (id, n, i32::from(end)))
    }

    pub fn response_body(&mut self, id: i32, chunk: &[u8], end: bool) -> i32 {
        // The context whose callback runs (Envoy tracks it for http calls made from it).
        self.state().current_context = id;
        self.state().response_chunk = chunk.to_vec();
        let n = i32::try_from(chunk.len()).unwrap();
        self.call::<(i32, i32, i32), i32>("proxy_on_response_body", (id, n, i32::from(end)))
    }

    /// The end of a stream as Envoy runs it: log, done, delete.
    pub fn finish(&mut self, id: i32) {
        // The context whose callback runs (Envoy tracks it for http calls made from it).
        self.state().current_context = id;
        self.call::<i32, ()>("proxy_on_log", id);
        self.call::<i32, i32>("proxy_on_done", id);
        self.call::<i32, ()>("proxy_on_delete", id);
    }

    /// Envoy retiring the root context (`proxy_on_done`); true when it is done at once.
    pub fn retire_root(&mut self) -> bool {
        self.state().current_context = ROOT;
        self.call::<i32, i32>("proxy_on_done", ROOT) == 1
    }

    /// Fires the root context's timer (`proxy_on_tick`).
    pub fn tick(&mut self) {
        self.state().current_context = ROOT;
        self.call::<i32, ()>("proxy_on_tick", ROOT);
    }

    /// Delivers the response to an http call.
    pub fn call_response(&mut self, id: i32, token: u32, status: u16) {
        // The context whose callback runs (Envoy tracks it for http calls made from it).
        self.state().current_context = id;
        self.state().call_response_headers = vec![(":status".into(), status.to_string())];
        self.call::<(i32, i32, i32, i32, i32), ()>(
            "proxy_on_http_call_response",
            (id, i32::try_from(token).unwrap(), 1, 0, 0),
        );
    }

    /// Fuel consumed so far (with [`Host::load_with`] and `fuel`).
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

/// Builds the plugin for wasm32-wasip1 with the `wasm` profile (as `make wasm` does) and returns
/// the module's bytes. Cargo is free to run while tests run, and an up-to-date build is instant.
pub fn build_wasm() -> Vec<u8> {
    static WASM: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    WASM.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .find(|p| p.join("Cargo.lock").exists())
            .expect("workspace root")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .current_dir(&root)
            .args([
                "build",
                "-p",
                "aigw-plugin",
                "--target",
                "wasm32-wasip1",
                "--profile",
                "wasm",
            ])
            .status()
            .expect("run cargo");
        assert!(
            status.success(),
            "building the plugin for wasm32-wasip1 failed (rustup target add wasm32-wasip1?)"
        );
        let target =
            std::env::var("CARGO_TARGET_DIR").map_or_else(|_| root.join("target"), Into::into);
        std::fs::read(target.join("wasm32-wasip1/wasm/aigw_plugin.wasm")).expect("read the module")
    })
    .clone()
}
