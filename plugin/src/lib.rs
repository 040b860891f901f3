//! The proxy-wasm adapter of the usage reporter: a thin shell around `aigw-plugin-core`.
//!
//! It loads and checks its config (refusing one it does not understand, so a bad rollout fails at
//! config time instead of silently reporting nothing). In `scrub` mode (an instance placed before
//! ext-auth) it removes client-sent gateway headers; in `report` mode it passes traffic through
//! until usage reporting arrives with the plugin issue.

use aigw_plugin_core::{Mode, PluginConfig, is_gateway_header};
use proxy_wasm::{
    traits::{Context, HttpContext, RootContext},
    types::{ContextType, LogLevel},
};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Debug, Default)]
struct Root {
    config: Option<PluginConfig>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let Some(bytes) = self.get_plugin_configuration() else {
            proxy_wasm::hostcalls::log(LogLevel::Error, "aigw-plugin: no plugin configuration")
                .ok();
            return false;
        };
        match PluginConfig::parse(&bytes) {
            Ok(config) => {
                self.config = Some(config);
                true
            }
            Err(e) => {
                proxy_wasm::hostcalls::log(LogLevel::Error, &format!("aigw-plugin: {e}")).ok();
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let mode = self.config.as_ref().map_or(Mode::Report, |c| c.mode);
        Some(Box::new(Request { mode }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[derive(Debug)]
struct Request {
    mode: Mode,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(
        &mut self,
        _num_headers: usize,
        _end_of_stream: bool,
    ) -> proxy_wasm::types::Action {
        if self.mode == Mode::Scrub {
            // Drop client-sent copies of the headers only the gateway may set; ext-auth, which
            // runs after this instance, adds the real ones.
            for (name, _) in self.get_http_request_headers() {
                if is_gateway_header(&name) {
                    self.set_http_request_header(&name, None);
                }
            }
        }
        proxy_wasm::types::Action::Continue
    }
}
