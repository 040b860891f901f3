//! The images (`scripts/oci-image.py`, what `make images` runs), read by a real consumer:
//! `standin/oci-check` loads each OCI layout with go-containerregistry (the library registries'
//! clients and Istio's and Higress's Wasm fetchers use), verifies every digest and size and
//! flattens the filesystem as a runtime would. Then each binary image's entrypoint runs from the
//! image's own files only (`chroot` as the image's non-root user; with the image's own dynamic
//! loader when the tests do not run as root), and the usage reporter's image yields the exact
//! module by the fetchers' rule. The tests use the debug binaries `cargo test` built; `make images`
//! packs the release ones the same way.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use aigw_testkit::unique_name;
use serde_json::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(unique_name("aigw-images"));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn oci_check() -> String {
    output(Command::new(format!("{ROOT}/scripts/build-go-tools.sh")).arg("oci-check"))
        .trim()
        .to_owned()
}

/// Builds `name`'s image from `input` into `out` and returns the script's line (name, digest, path).
fn build(kind: &str, name: &str, input: &Path, out: &Path) -> String {
    let flag = if kind == "wasm" { "--wasm" } else { "--binary" };
    output(
        Command::new("python3")
            .arg(format!("{ROOT}/scripts/oci-image.py"))
            .args([kind, "--name", name, flag])
            .arg(input)
            .arg("--out")
            .arg(out),
    )
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).trim() == "0"
}

#[test]
fn every_binary_image_runs_its_entrypoint_as_non_root_from_its_own_files() {
    let check = oci_check();
    let scratch = ScratchDir::new();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_aigw-operator"))
        .parent()
        .unwrap()
        .to_owned();
    for name in [
        "aigw-operator",
        "aigw-apiserver",
        "aigw-billing",
        "aigw-migrate",
    ] {
        let binary = bin_dir.join(name);
        assert!(
            binary.exists(),
            "{} missing: cargo build --workspace --bins",
            binary.display()
        );
        let layout = scratch.0.join(name);
        let line = build("binary", name, &binary, &layout);
        let digest = |l: &str| l.split_whitespace().nth(1).unwrap().to_owned();
        if name == "aigw-migrate" {
            // Reproducible: the same binary gives the same manifest digest (checked on the
            // smallest binary; packing a debug build takes seconds).
            let again = build("binary", name, &binary, &scratch.0.join("again"));
            assert_eq!(digest(&line), digest(&again), "{name} is not reproducible");
        }

        let rootfs_tar = scratch.0.join(format!("{name}.tar"));
        let seen: Value = serde_json::from_str(&output(
            Command::new(&check)
                .arg("image")
                .arg(&layout)
                .arg(&rootfs_tar),
        ))
        .unwrap();
        assert_eq!(seen["digest"].as_str().unwrap(), digest(&line));
        assert_eq!(seen["user"], "65532:65532", "{name} runs as non-root");
        let entrypoint = format!("/usr/local/bin/{name}");
        assert_eq!(seen["entrypoint"], serde_json::json!([entrypoint]));
        assert_eq!(seen["layers"].as_array().unwrap().len(), 1);

        let root = scratch.0.join(format!("{name}-root"));
        std::fs::create_dir_all(&root).unwrap();
        output(
            Command::new("tar")
                .arg("xf")
                .arg(&rootfs_tar)
                .arg("-C")
                .arg(&root),
        );
        let help = if is_root() {
            output(
                Command::new("chroot")
                    .arg("--userspec=65532:65532")
                    .arg(&root)
                    .arg(&entrypoint)
                    .arg("--help")
                    .env_clear()
                    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            )
        } else {
            // The image's own loader and libraries, never the host's.
            output(
                Command::new(root.join("lib64/ld-linux-x86-64.so.2"))
                    .arg("--library-path")
                    .arg(format!(
                        "{0}/lib/x86_64-linux-gnu:{0}/usr/lib/x86_64-linux-gnu",
                        root.display()
                    ))
                    .arg(root.join(entrypoint.trim_start_matches('/')))
                    .arg("--help")
                    .env_clear(),
            )
        };
        assert!(help.contains("Usage:"), "{name} --help: {help}");
    }
}

#[test]
fn the_usage_reporter_image_yields_the_module_by_the_wasm_fetchers_rule() {
    let check = oci_check();
    let scratch = ScratchDir::new();
    let module = aigw_standin::plugins::reporter().unwrap();
    let wasm = scratch.0.join("aigw_plugin.wasm");
    std::fs::write(&wasm, module).unwrap();
    let layout = scratch.0.join("aigw-plugin");
    let line = build("wasm", "aigw-plugin", &wasm, &layout);
    assert!(line.starts_with("aigw-plugin:0.1.0 sha256:"), "{line}");
    let pulled = scratch.0.join("plugin.wasm");
    let seen: Value = serde_json::from_str(&output(
        Command::new(&check).arg("wasm").arg(&layout).arg(&pulled),
    ))
    .unwrap();
    assert_eq!(
        seen["layers"],
        serde_json::json!(["application/vnd.oci.image.layer.v1.tar+gzip"])
    );
    assert_eq!(
        std::fs::read(&pulled).unwrap(),
        module,
        "the pulled module is the built one"
    );

    // Not a module: refused with the reason.
    let bad = scratch.0.join("not.wasm");
    std::fs::write(&bad, b"#!/bin/sh\n").unwrap();
    let out = Command::new("python3")
        .arg(format!("{ROOT}/scripts/oci-image.py"))
        .args(["wasm", "--name", "x", "--wasm"])
        .arg(&bad)
        .arg("--out")
        .arg(scratch.0.join("x"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a WebAssembly module"));
}
