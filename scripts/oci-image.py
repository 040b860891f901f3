#!/usr/bin/env python3
"""Assembles OCI image layouts without a container engine (none runs here, and none is needed).

  scripts/oci-image.py binary --name aigw-operator --binary target/release/aigw-operator --out DIR
  scripts/oci-image.py wasm   --name aigw-plugin   --wasm target/.../aigw_plugin.wasm   --out DIR

`binary`: one layer holding the binary at /usr/local/bin/<name>, the shared libraries `ldd` names
(glibc, libgcc_s, zlib — copied from the build machine, so build on the oldest glibc you deploy
on), /etc/passwd and /etc/group with the non-root user 65532, and the CA bundle. The entrypoint is
the binary, the user 65532:65532.

`wasm`: the usage reporter as Higress pulls a Wasm plugin (the "compat" image variant Istio's and
Higress's fetchers accept): one OCI tar+gzip layer holding `plugin.wasm`. Reference the pushed
image as `oci://<registry>/aigw-plugin:<tag>` (the chart's `higress.plugins.usageReporter`).

Reproducible: the same inputs give the same digests (entries sorted, owners 0, times 0, gzip
without a timestamp). Push a layout with any OCI tool, e.g. `skopeo copy oci:DIR docker://…`
or `crane push DIR …`.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile

EPOCH = "1970-01-01T00:00:00Z"
NONROOT = 65532
LAYER_MT = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MT = "application/vnd.oci.image.config.v1+json"
MANIFEST_MT = "application/vnd.oci.image.manifest.v1+json"
INDEX_MT = "application/vnd.oci.image.index.v1+json"
CA_BUNDLES = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"]


def die(msg):
    print(f"oci-image: {msg}", file=sys.stderr)
    sys.exit(1)


def shared_libraries(binary):
    """The files the dynamic loader maps for `binary` (empty for a static binary)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if out.returncode != 0:
        if "not a dynamic executable" in out.stdout + out.stderr:
            return []
        die(f"ldd {binary}: {out.stderr.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        m = re.search(r"=>\s+(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
        if m:
            libs.append(m.group(1))
        elif "=>" in line and "not found" in line:
            die(f"{binary}: {line.strip()}")
    return sorted(set(libs))


def add_dirs(entries, path):
    parts = path.strip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        entries.setdefault("/".join(parts[:i]), ("dir", None, 0o755))


def layer(entries):
    """A deterministic tar+gzip of `entries` {path: (kind, bytes, mode)}; returns (gz, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            kind, data, mode = entries[path]
            info = tarfile.TarInfo(path)
            info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = mode, 0, 0, 0, "", ""
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw_bytes = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", compresslevel=6, mtime=0, filename="") as f:
        f.write(raw_bytes)
    return gz.getvalue(), "sha256:" + hashlib.sha256(raw_bytes).hexdigest()


def write_blob(out, data):
    digest = hashlib.sha256(data).hexdigest()
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(out, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_layout(out, name, version, entries, config, platform, annotations):
    if os.path.exists(out) and os.listdir(out):
        die(f"{out} is not empty")
    os.makedirs(out, exist_ok=True)
    gz, diff_id = layer(entries)
    layer_desc = {"mediaType": LAYER_MT, **write_blob(out, gz)}
    config = {
        **platform,
        "created": EPOCH,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": EPOCH, "created_by": "scripts/oci-image.py"}],
    }
    config_desc = {"mediaType": CONFIG_MT, **write_blob(out, canonical(config))}
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MT,
        "config": config_desc,
        "layers": [layer_desc],
        "annotations": {"org.opencontainers.image.title": name,
                        "org.opencontainers.image.version": version,
                        "org.opencontainers.image.created": EPOCH, **annotations},
    }
    manifest_desc = {"mediaType": MANIFEST_MT, **write_blob(out, canonical(manifest))}
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX_MT,
        "manifests": [{**manifest_desc, "platform": platform,
                       "annotations": {"org.opencontainers.image.ref.name": version}}],
    }
    with open(os.path.join(out, "index.json"), "wb") as f:
        f.write(canonical(index))
    with open(os.path.join(out, "oci-layout"), "wb") as f:
        f.write(canonical({"imageLayoutVersion": "1.0.0"}))
    print(f"{name}:{version} {manifest_desc['digest']} {out}")


def read(path):
    with open(path, "rb") as f:
        return f.read()


def binary_image(args):
    entries = {}
    target = f"usr/local/bin/{args.name}"
    add_dirs(entries, target)
    entries[target] = ("file", read(args.binary), 0o755)
    for lib in shared_libraries(args.binary):
        path = lib.lstrip("/")
        add_dirs(entries, path)
        # The loader and libraries are copied as files at the paths the binary names (a link
        # such as /lib64/ld-linux-x86-64.so.2 becomes the file it points to).
        entries[path] = ("file", read(os.path.realpath(lib)), 0o755)
    for d in ["etc", "tmp"]:
        entries[d] = ("dir", None, 0o1777 if d == "tmp" else 0o755)
    entries["etc/passwd"] = ("file", f"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n".encode(), 0o644)
    entries["etc/group"] = ("file", f"root:x:0:\nnonroot:x:{NONROOT}:\n".encode(), 0o644)
    bundle = next((b for b in CA_BUNDLES if os.path.exists(b)), None)
    if bundle is None:
        die("no CA bundle on this machine (install ca-certificates)")
    add_dirs(entries, "etc/ssl/certs/ca-certificates.crt")
    entries["etc/ssl/certs/ca-certificates.crt"] = ("file", read(bundle), 0o644)
    config = {
        "User": f"{NONROOT}:{NONROOT}",
        "Entrypoint": [f"/{target}"],
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
        "WorkingDir": "/",
        "Labels": {"org.opencontainers.image.title": args.name},
    }
    write_layout(args.out, args.name, args.version, entries, config,
                 {"architecture": "amd64", "os": "linux"}, {})


def wasm_image(args):
    wasm = read(args.wasm)
    if wasm[:4] != b"\0asm":
        die(f"{args.wasm} is not a WebAssembly module")
    entries = {"plugin.wasm": ("file", wasm, 0o644)}
    write_layout(args.out, args.name, args.version, entries,
                 {"Labels": {"org.opencontainers.image.title": args.name}},
                 {"architecture": "wasm", "os": "wasip1"},
                 {"org.opencontainers.image.description": "AIGateway usage reporter (proxy-wasm) for Higress"})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    b = sub.add_parser("binary")
    b.add_argument("--binary", required=True)
    w = sub.add_parser("wasm")
    w.add_argument("--wasm", required=True)
    for s in (b, w):
        s.add_argument("--name", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--version", default="0.1.0")
    args = p.parse_args()
    (binary_image if args.kind == "binary" else wasm_image)(args)


if __name__ == "__main__":
    main()
