//! Test harness: runs the real `evstor` binary on free loopback ports in a temporary data
//! directory and talks to it over HTTPS with a real token.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod cluster;
pub mod oidc;
pub mod vm;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest a server may take to answer after start (RSA key generation included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Starts tried before giving up on finding free ports.
const START_ATTEMPTS: usize = 5;

/// A loopback port free right now, chosen below the kernel's ephemeral range: a server that
/// is restarted on its old ports (after a kill) must find them free, and outgoing connections
/// (etcd clients, peers, initiators) take their local ports from the ephemeral range only.
pub fn free_port() -> u16 {
    use rand::Rng;
    let low_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (10_000u16, low_ephemeral.max(10_001));
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(from..to);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A loopback port free right now whose next port is free too (the NVMe/TCP port: a
/// cluster member's replication listener takes the next one).
pub fn free_port_pair() -> u16 {
    for _ in 0..1000 {
        let p = free_port();
        if p < u16::MAX && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two consecutive free loopback ports")
}

/// The `evstor` binary the tests run: this build's, or `EVSTOR_TEST_BIN` (a repro loop
/// that keeps testing one build while the tree is rebuilt).
pub fn evstor_bin() -> PathBuf {
    std::env::var_os("EVSTOR_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_evstor")))
}

/// How to start a server, beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// More `evstor serve` arguments (e.g. `--api-idle-timeout-ms 500`).
    pub args: Vec<String>,
    /// The server process's `RLIMIT_NOFILE` as (soft, hard).
    pub open_files: Option<(u64, u64)>,
    /// Extra environment of the server process (e.g. `EVSTOR_FAILPOINT`).
    pub env: Vec<(String, String)>,
    /// The API port, when the test must know it before the start (else a free one).
    pub api_port: Option<u16>,
}

impl Options {
    /// Options with these extra arguments.
    pub fn args(args: &[&str]) -> Options {
        Options {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Options::default()
        }
    }
}

/// A running `evstor serve`.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub api_port: u16,
    pub nvme_port: u16,
    pub discovery_port: u16,
    options: Options,
    child: Option<Child>,
    /// Extra environment for the next starts (e.g. `EVSTOR_FAILPOINT`).
    env: Vec<(String, String)>,
}

impl Server {
    /// Starts a fresh cluster and waits until its API answers.
    /// Ports come from `free_port`, so another test may take one before the server binds it;
    /// such a start is retried on fresh ports.
    pub fn start() -> Server {
        Server::start_with(Options::default())
    }

    /// As [`Server::start`], with extra arguments or limits.
    pub fn start_with(options: Options) -> Server {
        let mut last_error = String::new();
        // One data directory for every attempt: an attempt that joined a cluster before it
        // failed to bind its ports left its name there, and the retry is that same member
        // starting again.
        let mut dir = Some(tempfile::tempdir().expect("temp dir"));
        for _ in 0..START_ATTEMPTS {
            let mut s = Server {
                dir: dir.take().expect("the data dir"),
                api_port: options.api_port.unwrap_or_else(free_port),
                nvme_port: free_port_pair(),
                discovery_port: free_port(),
                options: options.clone(),
                child: None,
                env: options.env.clone(),
            };
            match s.try_spawn() {
                Ok(()) => return s,
                Err(e) if e.contains("Address already in use") => {
                    last_error = e;
                    let _ = std::fs::remove_file(s.dir.path().join("server.log"));
                    let placeholder = tempfile::tempdir().expect("temp dir");
                    dir = Some(std::mem::replace(&mut s.dir, placeholder));
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("evstor could not bind free ports in {START_ATTEMPTS} attempts: {last_error}")
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the server on its ports, retrying a few times while one is still held (a
    /// socket of the killed process closing, or another test's probe of the port).
    fn spawn(&mut self) {
        let mut attempt = 0;
        loop {
            match self.try_spawn() {
                Ok(()) => return,
                Err(e) if e.contains("Address already in use") && attempt < START_ATTEMPTS => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("log file");
        let mut cmd = Command::new(evstor_bin());
        let open_files = self.options.open_files;
        // SAFETY: the closure runs in the forked child before exec; setrlimit is
        // async-signal-safe and the closure allocates nothing. No core file: the crash-only
        // tests make the server abort on purpose.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                if let Some((soft, hard)) = open_files {
                    let lim = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd
            .arg("serve")
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--api-addr")
            .arg(format!("127.0.0.1:{}", self.api_port))
            .arg("--nvme-addr")
            .arg(format!("127.0.0.1:{}", self.nvme_port))
            .arg("--discovery-addr")
            .arg(format!("127.0.0.1:{}", self.discovery_port))
            .args(&self.options.args)
            // `EVSTOR_TEST_LOG` (e.g. `info`) makes the servers' logs more detailed.
            .env(
                "EVSTOR_LOG",
                std::env::var("EVSTOR_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone().expect("log fd")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn evstor serve");
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let anon = Client::new(self.api_port, None);
        loop {
            if self.dir.path().join("admin.jwt").exists() {
                if let Ok((200, _)) = anon.try_get("/api/v2/version") {
                    return Ok(());
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!("evstor exited with {status}: {}", self.log()));
            }
            if Instant::now() >= deadline {
                return Err(format!("evstor did not start: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Sends `signal` to the server process (e.g. SIGSTOP, SIGCONT).
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }

    /// Starts the server again (same data directory and ports) after it was killed.
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            // A stop is clean: exit status 0, or the signal itself when it came before the
            // server installed its handler; never an abort on the way out.
            if let Ok(status) = c.wait() {
                use std::os::unix::process::ExitStatusExt;
                assert!(
                    std::thread::panicking()
                        || status.success()
                        || status.signal() == Some(libc::SIGTERM),
                    "the server did not stop cleanly: {status}\n{}",
                    self.log()
                );
            }
        }
    }

    /// Starts the binary again on the same data directory and ports.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn restart_after_kill9(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Stops the server and starts it again with `env` added to its environment (an empty
    /// list starts it with the plain environment again).
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.stop();
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn();
    }

    /// Waits for the server process to end on its own, at most `within` (a bound so a
    /// server that never exits fails the test instead of hanging it); `None` if it is still
    /// running then.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin.jwt")).expect("admin.jwt")
    }

    /// A client with the cluster-admin token.
    pub fn admin(&self) -> Client {
        Client::new(self.api_port, Some(self.admin_token()))
    }

    pub fn anonymous(&self) -> Client {
        Client::new(self.api_port, None)
    }

    /// A client whose token (minted by `evstor token create`) carries `roles`.
    pub fn client_with_roles(&self, roles: &[&str]) -> Client {
        Client::new(self.api_port, Some(self.token(roles)))
    }

    pub fn token(&self, roles: &[&str]) -> String {
        let mut cmd = Command::new(evstor_bin());
        cmd.args(["token", "create", "--data-dir"])
            .arg(self.dir.path());
        for r in roles {
            cmd.args(["--role", r]);
        }
        let out = cmd.output().expect("evstor token create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf8")
            .trim()
            .to_string()
    }

    /// Runs `evstor <args…>` against this data directory; returns (exit ok, stdout).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(evstor_bin())
            .args(args)
            .arg("--data-dir")
            .arg(self.dir.path())
            .output()
            .expect("run evstor");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Polls GET `path` until `done(json)` or the timeout.
    pub fn wait_for(&self, path: &str, done: impl Fn(u16, &Value) -> bool) -> Value {
        let c = self.admin();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = c.get(path);
            if done(status, &body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "timed out on {path}: {status} {body}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A blocking HTTPS client for the API (TLS verification off: the cert is self-signed).
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(port: u16, token: Option<String>) -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .disable_verification(true)
                    .build(),
            )
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Client {
            agent,
            base: format!("https://127.0.0.1:{port}"),
            token,
        }
    }

    pub fn with_token(&self, token: &str) -> Client {
        Client {
            token: Some(token.to_string()),
            ..self.clone()
        }
    }

    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    fn finish(
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, Value), String> {
        let mut resp = resp.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        let json = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, json))
    }

    pub fn try_get(&self, path: &str) -> Result<(u16, Value), String> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        Self::finish(req.call())
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.try_get(path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        self.delete_if_match(path, None)
    }

    /// As `delete`, with a transport failure (server gone) as an error instead of a panic.
    pub fn try_delete(&self, path: &str) -> Result<(u16, Value), String> {
        let mut req = self.agent.delete(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        Self::finish(req.call())
    }

    pub fn delete_if_match(&self, path: &str, etag: Option<&str>) -> (u16, Value) {
        let mut req = self.agent.delete(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        if let Some(e) = etag {
            req = req.header("If-Match", e);
        }
        Self::finish(req.call()).unwrap_or_else(|e| panic!("DELETE {path}: {e}"))
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send("POST", path, body, None)
    }

    /// As `post`, with a transport failure (server gone) as an error instead of a panic.
    pub fn try_post(&self, path: &str, body: &Value) -> Result<(u16, Value), String> {
        let mut req = self.agent.post(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        Self::finish(req.content_type("application/json").send(body.to_string()))
    }

    pub fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send("PUT", path, body, None)
    }

    pub fn put_if_match(&self, path: &str, body: &Value, etag: &str) -> (u16, Value) {
        self.send("PUT", path, body, Some(etag))
    }

    /// Sends raw text as the body (for malformed-JSON tests).
    pub fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let mut req = self.agent.post(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        Self::finish(req.content_type("application/json").send(body))
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// `method` on `path` with a JSON body (POST and PUT) and extra headers given as raw
    /// bytes (to send what a well-behaved client would not).
    pub fn send_with_headers(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &[u8])],
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let finish = |resp| Self::finish(resp).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        macro_rules! with_headers {
            ($req:expr) => {{
                let mut req = $req;
                if let Some(a) = self.auth() {
                    req = req.header("Authorization", a);
                }
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                req
            }};
        }
        match method {
            "GET" => finish(with_headers!(self.agent.get(url)).call()),
            "DELETE" => finish(with_headers!(self.agent.delete(url)).call()),
            _ => {
                let req = match method {
                    "POST" => self.agent.post(url),
                    _ => self.agent.put(url),
                };
                let text = body.map(Value::to_string).unwrap_or_default();
                finish(
                    with_headers!(req)
                        .content_type("application/json")
                        .send(text),
                )
            }
        }
    }

    /// A POST with extra headers; returns the status, the body and the response headers.
    pub fn post_with_headers(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> (u16, Value, Vec<(String, String)>) {
        let mut req = self.agent.post(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut resp = req
            .content_type("application/json")
            .send(body.to_string())
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let heads = header_pairs(resp.headers());
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (resp.status().as_u16(), json, heads)
    }

    /// A GET whose body is bytes (archives); returns the status, the response headers and
    /// the body.
    pub fn get_bytes(&self, path: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let mut resp = req.call().unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let heads = header_pairs(resp.headers());
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .unwrap_or_else(|e| panic!("GET {path} body: {e}"));
        (resp.status().as_u16(), heads, body)
    }

    fn send(&self, method: &str, path: &str, body: &Value, etag: Option<&str>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "POST" => self.agent.post(url),
            _ => self.agent.put(url),
        };
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        if let Some(e) = etag {
            req = req.header("If-Match", e);
        }
        Self::finish(req.content_type("application/json").send(body.to_string()))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }
}

/// Response headers as lowercase (name, value) pairs.
fn header_pairs(h: &ureq::http::HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                v.to_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}
