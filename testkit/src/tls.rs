//! Test certificates: a CA and one certificate per name it signed, made with the `openssl` CLI
//! (as the test bed makes its own) in a scratch directory that is removed afterwards. P-256 keys,
//! valid for two days. A name may be a wildcard (`*.sso.test`).

use std::process::Command;

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// The CA's certificate (PEM) and, in the order of `names`, one certificate for each.
pub fn certificates(names: &[&str]) -> Result<(Vec<u8>, Vec<Issued>), String> {
    let dir = std::env::temp_dir().join(crate::unique_name("aigw-tls"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = issue(&dir, names);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn issue(dir: &std::path::Path, names: &[&str]) -> Result<(Vec<u8>, Vec<Issued>), String> {
    let run = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .map_err(|e| format!("openssl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| format!("{name}: {e}"));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=aigw test CA",
        "-days",
        "2",
    ]);
    run(&ca)?;
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (key, csr, crt, ext) = (
            format!("{i}.key"),
            format!("{i}.csr"),
            format!("{i}.crt"),
            format!("{i}.ext"),
        );
        std::fs::write(dir.join(&ext), format!("subjectAltName=DNS:{name}\n"))
            .map_err(|e| format!("{ext}: {e}"))?;
        let mut req = vec!["req"];
        req.extend(ec);
        let subj = format!("/CN={name}");
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        run(&req)?;
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ])?;
        out.push(Issued {
            cert_pem: read(&crt)?,
            key_pem: read(&key)?,
        });
    }
    Ok((read("ca.crt")?, out))
}
