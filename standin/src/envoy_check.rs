//! The Envoy configs inside `EnvoyFilter`s, checked against Envoy's own protos by
//! `standin/envoy-check` (Go, go-control-plane; built by `scripts/build-go-tools.sh envoy-check`
//! into the cache outside the repo): an unknown or misplaced field, a wrong type or a broken
//! validation rule is a problem; the fields Higress's Envoy build adds are allowed by name.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

use crate::host::{Error, Result};

fn checker() -> Result<PathBuf> {
    static PATH: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| {
        let root = crate::plugins::workspace_root().map_err(|e| e.0)?;
        let out = Command::new(root.join("scripts/build-go-tools.sh"))
            .arg("envoy-check")
            .output()
            .map_err(|e| format!("scripts/build-go-tools.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "building envoy-check failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    })
    .clone()
    .map_err(Error)
}

/// The problems envoy-check finds in `envoy_filters` (JSON objects); empty when there are none.
pub fn problems(envoy_filters: &[Value]) -> Result<Vec<String>> {
    let mut child = Command::new(checker()?)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error(format!("envoy-check: {e}")))?;
    let input = serde_json::to_vec(envoy_filters).map_err(|e| Error(e.to_string()))?;
    child
        .stdin
        .take()
        .ok_or_else(|| Error("envoy-check: no stdin".into()))?
        .write_all(&input)
        .map_err(|e| Error(format!("envoy-check: {e}")))?;
    let out = child
        .wait_with_output()
        .map_err(|e| Error(format!("envoy-check: {e}")))?;
    match out.status.code() {
        Some(0 | 1) => Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()),
        _ => Err(Error(format!(
            "envoy-check failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))),
    }
}
