//! Runs one of our service binaries as a real child process against the test bed, for tests of
//! what only a process shows: flags and env, the ops endpoints, and graceful shutdown on SIGTERM.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

/// A running service binary; killed on drop if the test did not stop it.
#[derive(Debug)]
pub struct Service {
    child: Child,
    /// The `--ops-addr` it was given.
    pub ops_addr: SocketAddr,
}

/// Errors driving a service process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{what} not reached within {secs}s")]
    Timeout { what: String, secs: u64 },
    #[error("bad HTTP response: {0:?}")]
    Http(String),
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_addr() -> Result<SocketAddr, ProcessError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Service {
    /// Starts `bin` with `args` and `envs` (plus `AIGW_OPS_ADDR` on a free port) in a clean
    /// environment: only `PATH` and `HOME` are inherited, so nothing from the developer's shell leaks.
    pub fn start(bin: &Path, args: &[&str], envs: &[(&str, &str)]) -> Result<Self, ProcessError> {
        let ops_addr = free_addr()?;
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .envs(std::env::vars().filter(|(k, _)| k == "PATH" || k == "HOME"))
            .env("AIGW_OPS_ADDR", ops_addr.to_string())
            .env("AIGW_LOG_FORMAT", "json")
            .envs(envs.iter().copied())
            .args(args)
            .stdin(Stdio::null());
        let child = cmd.spawn()?;
        Ok(Self { child, ops_addr })
    }

    /// Polls `GET path` on the ops listener until it answers `want`, or fails after `secs`.
    pub fn wait_for_status(
        &self,
        path: &str,
        want: u16,
        secs: u64,
    ) -> Result<String, ProcessError> {
        self.wait_for(path, secs, |status, _| status == want)
    }

    /// Polls `GET path` on the ops listener until `accept(status, body)` holds; returns the body.
    pub fn wait_for(
        &self,
        path: &str,
        secs: u64,
        accept: impl Fn(u16, &str) -> bool,
    ) -> Result<String, ProcessError> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            match http_get(self.ops_addr, path) {
                Ok((status, body)) if accept(status, &body) => return Ok(body),
                Ok((status, body)) => last = format!("{status} {body}"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(ProcessError::Timeout {
            what: format!("an accepted answer from {path} (last: {last})"),
            secs,
        })
    }

    /// Sends SIGTERM and waits up to `secs` for the process to exit.
    pub fn terminate(mut self, secs: u64) -> Result<ExitStatus, ProcessError> {
        // `kill` is the portable way to send SIGTERM without unsafe code or a libc dependency.
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(ProcessError::Timeout {
                    what: "exit after SIGTERM".into(),
                    secs,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Service {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGKILL — no chance to flush or commit — and reaps the process (crash tests).
    pub fn kill(mut self) -> Result<ExitStatus, ProcessError> {
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET (no client dependency): returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), ProcessError> {
    let r = http_request(addr, "GET", path, &[])?;
    Ok((r.status, r.body))
}

/// A response of [`http_request`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 request with headers and no body, on a fresh connection.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse, ProcessError> {
    http_send(addr, method, path, headers, b"")
}

/// A minimal HTTP/1.1 request with a body.
pub fn http_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse, ProcessError> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(k);
        req.push_str(": ");
        req.push_str(v);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| ProcessError::Http(raw.clone()))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ProcessError::Http(head.to_owned()))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    })
}
