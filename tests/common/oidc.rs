//! A real OpenID Connect provider for the federation tests: `tests/oidc/provider.mjs` (the
//! npm package `oidc-provider`, installed by `npm ci` in `tests/oidc`, which `.ci/run` does)
//! run by node on loopback. It issues JWT access tokens by the client_credentials grant; the
//! resource indicator chooses their audience, algorithm and lifetime.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A running provider; killed on drop.
pub struct Provider {
    child: Child,
    /// Held open: the provider exits when its stdin closes (if the test dies).
    _stdin: ChildStdin,
    /// The issuer identifier (`http://127.0.0.1:<port>`).
    pub issuer: String,
    /// Its forward proxy (`http://127.0.0.1:<port>`).
    pub proxy: String,
    agent: ureq::Agent,
}

/// How long a provider may take to print its ready line, and how many starts are tried.
const READY_WAIT: Duration = Duration::from_secs(20);
const READY_ATTEMPTS: u32 = 3;

fn oidc_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oidc")
}

impl Provider {
    /// Starts a provider on a free port and waits for its ready line.
    pub fn start() -> Provider {
        Provider::start_on(0)
    }

    /// Starts a provider on `port` (0: any free one). On the port of an earlier one it is
    /// the same issuer with fresh signing keys: an IdP key rotation.
    pub fn start_on(port: u16) -> Provider {
        let dir = oidc_dir();
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "the federation tests need the npm package oidc-provider: run `npm ci` in {} \
             (.ci/run does)",
            dir.display()
        );
        // node has been seen to hang before its ready line (waiting on its thread pool):
        // such a start is killed and made again rather than blocking the suite.
        for attempt in 1..=READY_ATTEMPTS {
            if let Some(p) = Provider::try_start(port) {
                return p;
            }
            eprintln!("oidc provider: no ready line in {READY_WAIT:?} (attempt {attempt})");
        }
        panic!("the oidc provider never got ready");
    }

    fn try_start(port: u16) -> Option<Provider> {
        let mut child = Command::new("node")
            .arg("provider.mjs")
            .args(["--port", &port.to_string()])
            .current_dir(oidc_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run node (the federation tests need Node.js 20 or later)");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(READY_WAIT) {
            Ok(line) if !line.is_empty() => line,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        };
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("provider ready line {line:?}: {e}"));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Some(Provider {
            child,
            _stdin: stdin,
            issuer: ready["issuer"].as_str().expect("issuer").to_string(),
            proxy: ready["proxy"].as_str().expect("proxy").to_string(),
            agent,
        })
    }

    /// A JWT access token for `client` (client_credentials grant) with audience `aud`,
    /// lifetime `ttl_secs`, signed with `alg` (RS256 or ES256).
    pub fn token(&self, client: &str, aud: &str, alg: &str, ttl_secs: u64) -> String {
        let secret = format!("secret-{client}");
        let resource = format!("urn:evstor-test:aud={aud};alg={alg};ttl={ttl_secs}");
        let mut resp = self
            .agent
            .post(format!("{}/token", self.issuer))
            .send_form([
                ("grant_type", "client_credentials"),
                ("client_id", client),
                ("client_secret", secret.as_str()),
                ("resource", resource.as_str()),
                ("scope", "api"),
            ])
            .expect("token request");
        let text = resp.body_mut().read_to_string().expect("token answer");
        let body: Value = serde_json::from_str(&text).expect("token JSON");
        body["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access_token in {text}"))
            .to_string()
    }

    /// The port of its issuer URL.
    pub fn port(&self) -> u16 {
        self.issuer
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("issuer port")
    }

    /// The provider's request counters (`discovery`, `jwks`, `token`, `proxied`).
    pub fn stats(&self) -> Value {
        let mut resp = self
            .agent
            .get(format!("{}/test/stats", self.issuer))
            .call()
            .expect("stats");
        serde_json::from_str(&resp.body_mut().read_to_string().expect("stats body"))
            .expect("stats JSON")
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
