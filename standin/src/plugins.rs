//! Where the plugin modules come from.
//!
//! Higress's own builds (`ext-auth`, `ai-proxy`, `model-router`, `ai-statistics`) are read from
//! `AIGW_HIGRESS_PLUGINS`, by default the reference folder next to the project
//! (`../shared/reference/higress/plugins/`); its README says how a clone without it rebuilds them
//! from Higress's source. Our reporter is built with cargo, as `make wasm` does.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::host::{Error, Result};

/// The workspace root (the folder holding `Cargo.lock`).
pub fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|p| p.join("Cargo.lock").exists())
        .map(Path::to_path_buf)
        .ok_or_else(|| Error("no workspace root above the stand-in crate".into()))
}

/// The folder of Higress's plugin builds.
pub fn higress_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("AIGW_HIGRESS_PLUGINS") {
        return Ok(dir.into());
    }
    Ok(workspace_root()?.join("../shared/reference/higress/plugins"))
}

/// The bytes of Higress's plugin `name` (e.g. `ai-proxy`), read once per process.
pub fn higress(name: &str) -> Result<&'static [u8]> {
    type Loaded = std::sync::Mutex<Vec<(String, &'static [u8])>>;
    static CACHE: OnceLock<Loaded> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().map_err(|_| Error("poisoned".into()))?;
    if let Some((_, b)) = cache.iter().find(|(n, _)| n == name) {
        return Ok(b);
    }
    let path = higress_dir()?.join(format!("{name}.wasm"));
    let bytes = std::fs::read(&path).map_err(|e| {
        Error(format!(
            "{}: {e} (set AIGW_HIGRESS_PLUGINS to a folder of Higress plugin builds)",
            path.display()
        ))
    })?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    cache.push((name.to_owned(), bytes));
    Ok(bytes)
}

/// Builds our usage reporter for `wasm32-wasip1` with the `wasm` profile (as `make wasm` does)
/// and returns the module's bytes, once per process. An up-to-date build is instant.
pub fn reporter() -> Result<&'static [u8]> {
    static WASM: OnceLock<std::result::Result<Vec<u8>, String>> = OnceLock::new();
    WASM.get_or_init(|| build_reporter().map_err(|e| e.0))
        .as_deref()
        .map_err(|e| Error(e.clone()))
}

fn build_reporter() -> Result<Vec<u8>> {
    let root = workspace_root()?;
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
        .map_err(|e| Error(format!("run cargo: {e}")))?;
    if !status.success() {
        return Err(Error(
            "building the plugin for wasm32-wasip1 failed (rustup target add wasm32-wasip1?)"
                .into(),
        ));
    }
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(|_| root.join("target"), Into::into);
    std::fs::read(target.join("wasm32-wasip1/wasm/aigw_plugin.wasm"))
        .map_err(|e| Error(format!("read the module: {e}")))
}

/// Whether the reference material the stand-in reads in place is here: Higress's plugin builds and
/// the recorded provider responses. A user's own clone may lack it (it is never copied into the
/// repo): then a test that needs it says so and skips — except under CI (`CI` set), where its
/// absence is a failure (an error), never a silent skip.
pub fn reference_available(test: &str) -> Result<bool> {
    let dirs = [higress_dir(), crate::provider::recordings_dir()];
    let missing: Vec<String> = dirs
        .iter()
        .filter_map(|d| match d {
            Ok(p) if p.is_dir() => None,
            Ok(p) => Some(p.display().to_string()),
            Err(e) => Some(e.0.clone()),
        })
        .collect();
    if missing.is_empty() {
        return Ok(true);
    }
    let msg = format!(
        "{test}: reference material absent ({}); set AIGW_HIGRESS_PLUGINS / AIGW_LLM_RESPONSES \
         (the plugins' README says how to rebuild them from Higress's source)",
        missing.join(", ")
    );
    if std::env::var_os("CI").is_some() {
        return Err(Error(msg));
    }
    eprintln!("skipped: {msg}");
    Ok(false)
}
