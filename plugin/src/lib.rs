//! The proxy-wasm adapter of the usage reporter: a thin shell around `aigw-plugin-core`.
//!
//! Today it loads and checks its config (refusing one it does not understand, so a bad rollout fails
//! at config time instead of silently reporting nothing) and passes traffic through; usage reporting
//! arrives with the plugin issue.

use aigw_plugin_core::PluginConfig;
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
        Some(Box::new(Request))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[derive(Debug)]
struct Request;

impl Context for Request {}

impl HttpContext for Request {}
