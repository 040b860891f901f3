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
