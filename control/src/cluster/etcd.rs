//! An etcd v3 client over etcd's JSON gRPC gateway (`POST /v3/...`), with no gRPC stack.
//!
//! Blocking on purpose: every caller (the journal writer, the follower, the lease session,
//! the orchestrator) is a plain thread that makes one call at a time, and a blocking client
//! over `std::net::TcpStream` with socket timeouts is a few hundred lines where an async
//! HTTP client would pull in hyper's client half and a second connection model. Each
//! component forks its own client ([`EtcdClient::fork`]) and so its own keep-alive
//! connection; calls on one client are serialized.
//!
//! JSON mapping (etcd's `rpc.proto` through grpc-gateway, original field names): keys and
//! values are base64, 64-bit integers are strings, zero values are omitted (`"succeeded"`
//! is absent when a transaction's compare failed, a watch event's `"type"` is absent for
//! PUT). Errors come back as an HTTP status with `{"error","message","code"}` (a gRPC code).
//!
//! `https://` endpoints are reached over TLS ([`EtcdTls`]: the CAs to trust, and the client
//! certificate etcd asks for with `--client-cert-auth`); the whole journal's order lives in
//! etcd, so on any network but a private one it should be.
//!
//! With etcd's authentication on (`etcdctl auth enable`), a client given a user
//! ([`EtcdAuth`]) signs in (`/v3/auth/authenticate`) for a token and sends it with every
//! request and watch; when etcd says the token is no longer valid (it expires after
//! `--auth-token-ttl`, 5 minutes by default, and dies with the member that issued a
//! simple token) it signs in again and repeats the request once.
//!
//! Every call has a deadline ([`ETCD_CALL_DEADLINE_MS`]); within it a call moves on to the
//! next endpoint when a member is unreachable, times out, or answers "unavailable" (no
//! leader, no quorum). Only the caller can tell whether repeating a write is safe; all of
//! ours are compare-and-swap transactions, puts of the same value or lease operations.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use super::http::{self, BodyReader};
use crate::limits::{
    ETCD_CALL_DEADLINE_MS, ETCD_CONNECT_MS, ETCD_REQUEST_MS, ETCD_RESPONSE_BYTES_MAX,
};

/// What can go wrong talking to etcd.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    /// No member answered within the deadline, or those that answered have no leader or
    /// quorum. The outcome of a write that ends this way is unknown.
    #[error("etcd is unavailable (no member reachable, or no quorum): {0}")]
    Unavailable(String),
    /// etcd understood the request and refused it.
    #[error("etcd refused the request (gRPC code {code}): {message}")]
    Refused { code: i64, message: String },
    /// The revision asked for has been compacted away.
    #[error("etcd revision {0} is compacted")]
    Compacted(i64),
    /// An answer we cannot read, or a bad endpoint.
    #[error("etcd protocol: {0}")]
    Protocol(String),
}

pub type EtcdResult<T> = Result<T, EtcdError>;

/// How to reach `https://` etcd endpoints: the CAs to trust and, when etcd checks clients
/// (`--client-cert-auth`), the certificate to present.
#[derive(Clone)]
pub struct EtcdTls(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdTls")
    }
}

impl EtcdTls {
    /// Trusts the CAs in `ca` (PEM), or the system's bundle without one, and presents the
    /// certificate chain `cert` with its private key `key` (PEM) when given.
    pub fn new(ca: Option<&Path>, client: Option<(&Path, &Path)>) -> anyhow::Result<EtcdTls> {
        use anyhow::Context;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let system = crate::idp::fetch::SYSTEM_CA_BUNDLES
            .iter()
            .map(Path::new)
            .find(|p| p.exists());
        let file = ca.or(system).context(
            "no CA to verify etcd with: give --etcd-cacert (no system CA bundle was found)",
        )?;
        let certs = CertificateDer::pem_file_iter(file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading CA certificates from {}", file.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs);
        anyhow::ensure!(
            added > 0,
            "{} holds no usable CA certificate",
            file.display()
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .with_context(|| format!("reading the certificate {}", cert.display()))?;
                anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
                let key = PrivateKeyDer::from_pem_file(key)
                    .with_context(|| format!("reading the private key {}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .context("the etcd client certificate and key do not go together")?
            }
        };
        Ok(EtcdTls(Arc::new(config)))
    }
}

/// A connection to a member: plain TCP, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

/// A TLS failure named as one (etcd refusing our certificate shows only at the first read
/// under TLS 1.3, as an alert).
fn tls_error(e: std::io::Error) -> std::io::Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => std::io::Error::new(e.kind(), format!("TLS: {t}")),
        None => e,
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf).map_err(tls_error),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf).map_err(tls_error),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush().map_err(tls_error),
        }
    }
}

/// A key as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
}

/// The answer to a range read.
#[derive(Debug, Clone, Default)]
pub struct RangeResult {
    /// The store revision the read saw.
    pub revision: i64,
    pub kvs: Vec<Kv>,
    /// More keys matched than `limit` allowed.
    pub more: bool,
}

/// A range read.
#[derive(Debug, Clone, Default)]
pub struct Range {
    pub key: Vec<u8>,
    /// End of the range (exclusive); empty for the single key.
    pub range_end: Vec<u8>,
    /// 0: no limit.
    pub limit: i64,
    pub keys_only: bool,
    /// Newest key first.
    pub descending: bool,
    /// Served by the member alone, without a quorum round: possibly stale, never
    /// uncommitted. Used where a stale answer only delays us.
    pub serializable: bool,
}

impl Range {
    pub fn key(key: &[u8]) -> Range {
        Range {
            key: key.to_vec(),
            ..Range::default()
        }
    }

    /// Every key starting with `prefix`.
    pub fn prefix(prefix: &[u8]) -> Range {
        Range {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
            ..Range::default()
        }
    }

    fn json(&self) -> Value {
        let mut v = json!({ "key": B64.encode(&self.key) });
        if !self.range_end.is_empty() {
            v["range_end"] = B64.encode(&self.range_end).into();
        }
        if self.limit > 0 {
            v["limit"] = self.limit.to_string().into();
        }
        if self.keys_only {
            v["keys_only"] = true.into();
        }
        if self.descending {
            v["sort_order"] = "DESCEND".into();
            v["sort_target"] = "KEY".into();
        }
        if self.serializable {
            v["serializable"] = true.into();
        }
        v
    }
}

/// The end of the range of keys that start with `prefix` (etcd's convention).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// One condition of a transaction (all are equality tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's last modification revision (0: the key does not exist).
    ModRevision(Vec<u8>, i64),
    /// The key's creation revision (0: the key does not exist).
    CreateRevision(Vec<u8>, i64),
}

impl Compare {
    fn json(&self) -> Value {
        match self {
            Compare::ModRevision(k, r) => json!({
                "key": B64.encode(k), "target": "MOD", "result": "EQUAL",
                "mod_revision": r.to_string(),
            }),
            Compare::CreateRevision(k, r) => json!({
                "key": B64.encode(k), "target": "CREATE", "result": "EQUAL",
                "create_revision": r.to_string(),
            }),
        }
    }
}

/// One operation of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        /// 0: no lease.
        lease: i64,
    },
    Range(Range),
    /// Deletes `[key, range_end)`, or the single key when `range_end` is empty.
    Delete {
        key: Vec<u8>,
        range_end: Vec<u8>,
    },
}

impl Op {
    fn json(&self) -> Value {
        match self {
            Op::Put { key, value, lease } => {
                let mut p = json!({ "key": B64.encode(key), "value": B64.encode(value) });
                if *lease != 0 {
                    p["lease"] = lease.to_string().into();
                }
                json!({ "request_put": p })
            }
            Op::Range(r) => json!({ "request_range": r.json() }),
            Op::Delete { key, range_end } => {
                let mut d = json!({ "key": B64.encode(key) });
                if !range_end.is_empty() {
                    d["range_end"] = B64.encode(range_end).into();
                }
                json!({ "request_delete_range": d })
            }
        }
    }
}

/// What one operation of a transaction returned.
#[derive(Debug, Clone)]
pub enum OpResult {
    Put,
    Range(RangeResult),
    Delete { deleted: i64 },
}

/// The answer to a transaction.
#[derive(Debug, Clone)]
pub struct TxnResult {
    /// Every compare held and the success branch ran.
    pub succeeded: bool,
    /// The store revision after the transaction (its own revision when it wrote).
    pub revision: i64,
    pub responses: Vec<OpResult>,
}

/// A member's view of the cluster.
#[derive(Debug, Clone)]
pub struct Status {
    pub member_id: String,
    /// Member id of the raft leader (empty: none).
    pub leader: String,
    pub revision: i64,
}

/// A connection to one member, kept for the next call.
struct Conn {
    endpoint: usize,
    reader: BufReader<Stream>,
}

/// A client of one etcd cluster.
pub struct EtcdClient {
    endpoints: Arc<Vec<String>>,
    /// `https://` endpoints: how to reach them.
    tls: Option<EtcdTls>,
    /// The member tried first (the last that answered).
    preferred: Arc<AtomicUsize>,
    conn: Mutex<Option<Conn>>,
    deadline: Duration,
    /// The etcd user to sign in as, when etcd's authentication is on.
    auth: Option<Arc<EtcdAuth>>,
}

/// An etcd user's name and password, and the token signing in gave (shared by the forks
/// of a client).
pub struct EtcdAuth {
    user: String,
    password: String,
    token: Mutex<Option<String>>,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl EtcdAuth {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Arc<EtcdAuth> {
        Arc::new(EtcdAuth {
            user: user.into(),
            password: password.into(),
            token: Mutex::new(None),
        })
    }

    /// The user (`--etcd-user`), and the password read from `file` (its first line).
    pub fn from_file(user: &str, file: &Path) -> anyhow::Result<Arc<EtcdAuth>> {
        use anyhow::Context;
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the etcd password from {}", file.display()))?;
        let password = text.lines().next().unwrap_or_default();
        anyhow::ensure!(
            !user.is_empty() && !password.is_empty(),
            "an etcd user needs a name and a password (the first line of {})",
            file.display()
        );
        Ok(EtcdAuth::new(user, password))
    }

    fn token(&self) -> Option<String> {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets `stale` (a token etcd no longer takes), unless another caller already
    /// replaced it.
    fn forget(&self, stale: &str) {
        let mut t = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if t.as_deref() == Some(stale) {
            *t = None;
        }
    }
}

/// Whether etcd refused a request for its token (expired, or unknown to this member).
fn is_stale_token(status: u16, v: &Value) -> bool {
    let message = v["message"].as_str().or(v["error"].as_str()).unwrap_or("");
    (status != 200 || !v["error"].is_null()) && message.contains("invalid auth token")
}

/// `--etcd` endpoints as parsed: `host:port` each, and whether they are `https://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub hosts: Vec<String>,
    pub https: bool,
}

/// Parses `--etcd` endpoints: `http://host:port` (or `host:port`) or `https://host:port`,
/// comma-separated, all of one scheme.
pub fn parse_endpoints(list: &str) -> EtcdResult<Endpoints> {
    let mut hosts = Vec::new();
    let mut schemes = std::collections::BTreeSet::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (https, hostport) = match item.strip_prefix("https://") {
            Some(rest) => (true, rest),
            None => (false, item.strip_prefix("http://").unwrap_or(item)),
        };
        let hostport = hostport.trim_end_matches('/');
        if hostport.is_empty() || hostport.contains('/') || !hostport.contains(':') {
            return Err(EtcdError::Protocol(format!(
                "{item:?} is not an etcd endpoint like http://127.0.0.1:2379"
            )));
        }
        schemes.insert(https);
        hosts.push(hostport.to_string());
    }
    if hosts.is_empty() {
        return Err(EtcdError::Protocol("no etcd endpoint given".into()));
    }
    if schemes.len() > 1 {
        return Err(EtcdError::Protocol(format!(
            "{list}: give every etcd endpoint with the same scheme (all https:// or none)"
        )));
    }
    Ok(Endpoints {
        hosts,
        https: schemes.contains(&true),
    })
}

/// The name a member's certificate must carry: its host (an IP address or a DNS name).
fn server_name(hostport: &str) -> EtcdResult<rustls::pki_types::ServerName<'static>> {
    let host = hostport
        .rsplit_once(':')
        .map_or(hostport, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) => Ok(rustls::pki_types::ServerName::IpAddress(ip.into())),
        Err(_) => rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| EtcdError::Protocol(format!("{hostport}: {e}"))),
    }
}

fn unavailable(endpoint: &str, what: impl std::fmt::Display) -> EtcdError {
    EtcdError::Unavailable(format!("{endpoint}: {what}"))
}

impl EtcdClient {
    pub fn new(endpoints: Vec<String>) -> EtcdClient {
        EtcdClient {
            endpoints: Arc::new(endpoints),
            tls: None,
            preferred: Arc::new(AtomicUsize::new(0)),
            conn: Mutex::new(None),
            deadline: Duration::from_millis(ETCD_CALL_DEADLINE_MS),
            auth: None,
        }
    }

    /// Another client of the same cluster with its own connection (one per thread).
    pub fn fork(&self) -> EtcdClient {
        EtcdClient {
            endpoints: self.endpoints.clone(),
            tls: self.tls.clone(),
            preferred: self.preferred.clone(),
            conn: Mutex::new(None),
            deadline: self.deadline,
            auth: self.auth.clone(),
        }
    }

    /// The same client signing in to etcd as `auth`'s user.
    pub fn with_auth(mut self, auth: Arc<EtcdAuth>) -> EtcdClient {
        self.auth = Some(auth);
        self
    }

    /// The same client reaching its endpoints over TLS.
    pub fn with_tls(mut self, tls: EtcdTls) -> EtcdClient {
        self.tls = Some(tls);
        self
    }

    /// The same client with another overall deadline per call.
    pub fn with_deadline(mut self, deadline: Duration) -> EtcdClient {
        self.deadline = deadline;
        self
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Connects to member `i` with the connect timeout, trying each address it resolves to.
    fn connect(&self, i: usize) -> EtcdResult<TcpStream> {
        let endpoint = &self.endpoints[i];
        let addrs: Vec<SocketAddr> = endpoint
            .to_socket_addrs()
            .map_err(|e| unavailable(endpoint, format!("cannot resolve: {e}")))?
            .collect();
        let mut last = unavailable(endpoint, "resolves to no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(ETCD_CONNECT_MS)) {
                Ok(s) => return Ok(s),
                Err(e) => last = unavailable(endpoint, e),
            }
        }
        Err(last)
    }

    /// A fresh stream to member `i` with the request timeouts set (TLS established, for
    /// `https://` endpoints).
    fn stream_to(&self, i: usize, read_timeout: Duration) -> EtcdResult<Stream> {
        let s = self.connect(i)?;
        let endpoint = &self.endpoints[i];
        s.set_read_timeout(Some(read_timeout))
            .and_then(|()| s.set_write_timeout(Some(Duration::from_millis(ETCD_REQUEST_MS))))
            .and_then(|()| s.set_nodelay(true))
            .map_err(|e| unavailable(endpoint, e))?;
        let Some(tls) = &self.tls else {
            return Ok(Stream::Plain(s));
        };
        let name = server_name(endpoint)?;
        let conn = rustls::ClientConnection::new(tls.0.clone(), name)
            .map_err(|e| EtcdError::Protocol(format!("{endpoint}: TLS: {e}")))?;
        let mut tls = rustls::StreamOwned::new(conn, s);
        // The handshake now, so a certificate etcd refuses (or we do) is named as such.
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| unavailable(endpoint, format!("TLS handshake: {}", tls_error(e))))?;
        }
        Ok(Stream::Tls(Box::new(tls)))
    }

    /// `e` from an established connection, with what it likely means over TLS: a member
    /// that refuses our client certificate closes the connection after the handshake.
    fn explain(&self, e: std::io::Error) -> String {
        use std::io::ErrorKind::*;
        match e.kind() {
            BrokenPipe | ConnectionReset | UnexpectedEof if self.tls.is_some() => format!(
                "{e} (the member closed the TLS connection: does it accept this server's \
                 client certificate, --etcd-cert?)"
            ),
            _ => e.to_string(),
        }
    }

    /// One request to member `i` on the kept connection (reconnecting once if it went
    /// stale); returns the status and the parsed body.
    fn request_once(
        &self,
        i: usize,
        path: &str,
        body: &[u8],
        token: Option<&str>,
    ) -> EtcdResult<(u16, Value)> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let endpoint = &self.endpoints[i];
        for fresh in [false, true] {
            let reuse = !fresh && slot.as_ref().is_some_and(|c| c.endpoint == i);
            if !reuse {
                let s = self.stream_to(i, Duration::from_millis(ETCD_REQUEST_MS))?;
                *slot = Some(Conn {
                    endpoint: i,
                    reader: BufReader::new(s),
                });
            }
            let Some(conn) = slot.as_mut() else {
                continue;
            };
            match exchange(&mut conn.reader, endpoint, path, body, token) {
                Ok((status, value, close)) => {
                    if close {
                        *slot = None;
                    }
                    return Ok((status, value));
                }
                // A kept connection the member closed meanwhile: try once on a new one.
                Err(e) if reuse && is_stale(&e) => *slot = None,
                Err(e) => {
                    *slot = None;
                    return Err(unavailable(endpoint, self.explain(e)));
                }
            }
        }
        Err(unavailable(endpoint, "no connection"))
    }

    /// Calls `path` with `body`, moving through the members until one answers or the
    /// deadline passes.
    pub fn call(&self, path: &str, body: &Value) -> EtcdResult<Value> {
        let raw = serde_json::to_vec(body).map_err(|e| EtcdError::Protocol(e.to_string()))?;
        let deadline = Instant::now() + self.deadline;
        let n = self.endpoints.len();
        let mut i = self.preferred.load(Ordering::Relaxed) % n;
        let mut tried = 0usize;
        loop {
            let failed = match self.request_signed_in(i, path, &raw) {
                Ok((200, value)) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(value);
                }
                Ok((status, value)) => match gateway_error(status, &value) {
                    e @ EtcdError::Unavailable(_) => e,
                    e => return Err(e),
                },
                Err(e) => e,
            };
            tried += 1;
            i = (i + 1) % n;
            if Instant::now() >= deadline {
                return Err(failed);
            }
            if tried.is_multiple_of(n) {
                // Every member failed once: do not spin while etcd elects a leader.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// One request to member `i` with the user's token (signing in first when there is
    /// none, and again once if etcd says the token went stale).
    fn request_signed_in(&self, i: usize, path: &str, raw: &[u8]) -> EtcdResult<(u16, Value)> {
        let Some(auth) = &self.auth else {
            return self.request_once(i, path, raw, None);
        };
        for again in [false, true] {
            let token = self.signed_in(i, auth)?;
            let (status, value) = self.request_once(i, path, raw, Some(&token))?;
            if again || !is_stale_token(status, &value) {
                return Ok((status, value));
            }
            auth.forget(&token);
        }
        unreachable!("the second attempt returns")
    }

    /// The user's token, signing in on member `i` when there is none yet.
    fn signed_in(&self, i: usize, auth: &EtcdAuth) -> EtcdResult<String> {
        if let Some(t) = auth.token() {
            return Ok(t);
        }
        let body = json!({ "name": auth.user, "password": auth.password });
        let raw = serde_json::to_vec(&body).map_err(|e| EtcdError::Protocol(e.to_string()))?;
        let (status, v) = self.request_once(i, "/v3/auth/authenticate", &raw, None)?;
        if status != 200 {
            return Err(match gateway_error(status, &v) {
                EtcdError::Refused { code, message } => EtcdError::Refused {
                    code,
                    message: format!("signing in as etcd user {:?}: {message}", auth.user),
                },
                e => e,
            });
        }
        let token = v["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| EtcdError::Protocol("etcd signed us in without a token".into()))?
            .to_string();
        *auth.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
        Ok(token)
    }

    pub fn range(&self, r: &Range) -> EtcdResult<RangeResult> {
        let v = self.call("/v3/kv/range", &r.json())?;
        parse_range(&v)
    }

    /// The single key, if it exists.
    pub fn get(&self, key: &[u8]) -> EtcdResult<Option<Kv>> {
        Ok(self.range(&Range::key(key))?.kvs.into_iter().next())
    }

    pub fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> EtcdResult<TxnResult> {
        let body = json!({
            "compare": compare.iter().map(Compare::json).collect::<Vec<_>>(),
            "success": success.iter().map(Op::json).collect::<Vec<_>>(),
            "failure": failure.iter().map(Op::json).collect::<Vec<_>>(),
        });
        let v = self.call("/v3/kv/txn", &body)?;
        let responses = v["responses"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(parse_op_result)
                    .collect::<EtcdResult<Vec<_>>>()
            })
            .transpose()?
            .unwrap_or_default();
        Ok(TxnResult {
            succeeded: v["succeeded"].as_bool().unwrap_or(false),
            revision: header_revision(&v)?,
            responses,
        })
    }

    /// Deletes `[key, range_end)`; returns how many keys went.
    pub fn delete_range(&self, key: &[u8], range_end: &[u8]) -> EtcdResult<i64> {
        let mut body = json!({ "key": B64.encode(key) });
        if !range_end.is_empty() {
            body["range_end"] = B64.encode(range_end).into();
        }
        let v = self.call("/v3/kv/deleterange", &body)?;
        int(&v["deleted"])
    }

    /// Drops the history before `revision` (keys' current values stay).
    pub fn compact(&self, revision: i64) -> EtcdResult<()> {
        self.call(
            "/v3/kv/compaction",
            &json!({ "revision": revision.to_string() }),
        )
        .map(|_| ())
    }

    /// A new lease; returns (id, granted TTL in seconds).
    pub fn lease_grant(&self, ttl_secs: i64) -> EtcdResult<(i64, i64)> {
        let v = self.call("/v3/lease/grant", &json!({ "TTL": ttl_secs.to_string() }))?;
        if let Some(e) = v["error"].as_str().filter(|e| !e.is_empty()) {
            return Err(EtcdError::Refused {
                code: 0,
                message: e.to_string(),
            });
        }
        Ok((int(&v["ID"])?, int(&v["TTL"])?))
    }

    /// Renews a lease; returns its TTL in seconds, 0 when the lease is gone (expired or
    /// revoked).
    pub fn lease_keepalive(&self, id: i64) -> EtcdResult<i64> {
        // A bidirectional stream in gRPC; through the gateway one request gives one answer.
        let v = self.call("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))?;
        int(&v["result"]["TTL"])
    }

    pub fn lease_revoke(&self, id: i64) -> EtcdResult<()> {
        self.call("/v3/lease/revoke", &json!({ "ID": id.to_string() }))
            .map(|_| ())
    }

    /// The status of the member the call reached.
    pub fn status(&self) -> EtcdResult<Status> {
        let v = self.call("/v3/maintenance/status", &json!({}))?;
        Ok(Status {
            member_id: v["header"]["member_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            leader: v["leader"].as_str().unwrap_or_default().to_string(),
            revision: header_revision(&v)?,
        })
    }

    /// Opens a watch of `[key, range_end)` from `start_revision` on the preferred member
    /// (then the others). `idle` bounds how long a read may wait for the next message.
    pub fn watch(
        &self,
        key: &[u8],
        range_end: &[u8],
        start_revision: i64,
        idle: Duration,
    ) -> EtcdResult<Watch> {
        let body = json!({ "create_request": {
            "key": B64.encode(key),
            "range_end": B64.encode(range_end),
            "start_revision": start_revision.to_string(),
        }});
        let raw = serde_json::to_vec(&body).map_err(|e| EtcdError::Protocol(e.to_string()))?;
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut last = EtcdError::Unavailable("no attempt made".into());
        for k in 0..n {
            let i = (first + k) % n;
            let attempt = self.open_watch(i, &raw, idle).and_then(|mut w| {
                if self.auth.is_none() {
                    return Ok(w);
                }
                // Under authentication etcd checks the token as it creates the watch, and
                // cancels it in its first message if the token went stale (which forgets
                // it): then sign in again, once.
                match w.peek_first()? {
                    true => self.open_watch(i, &raw, idle).and_then(|mut w| {
                        w.peek_first()?;
                        Ok(w)
                    }),
                    false => Ok(w),
                }
            });
            match attempt {
                Ok(w) => return Ok(w),
                Err(e @ EtcdError::Unavailable(_)) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Opens a watch (`raw`: its create request) on member `i`.
    fn open_watch(&self, i: usize, raw: &[u8], idle: Duration) -> EtcdResult<Watch> {
        let endpoint = self.endpoints[i].clone();
        let token = self
            .auth
            .as_ref()
            .map(|auth| self.signed_in(i, auth))
            .transpose()?;
        let mut s = self.stream_to(i, idle)?;
        let headers: &[(&str, &str)] = match &token {
            Some(t) => &[("Authorization", t.as_str())],
            None => &[],
        };
        http::write_request(&mut s, "POST", &endpoint, "/v3/watch", headers, raw)
            .map_err(|e| unavailable(&endpoint, self.explain(e)))?;
        let mut reader = BufReader::new(s);
        let head =
            http::read_head(&mut reader).map_err(|e| unavailable(&endpoint, self.explain(e)))?;
        if head.status != 200 {
            let body = BodyReader::new(&mut reader, &head)
                .read_all(ETCD_RESPONSE_BYTES_MAX)
                .map_err(|e| unavailable(&endpoint, self.explain(e)))?;
            let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if let (Some(auth), Some(t)) = (&self.auth, &token) {
                if is_stale_token(head.status, &v) {
                    auth.forget(t);
                }
            }
            return Err(gateway_error(head.status, &v));
        }
        let signed_in = self.auth.clone().zip(token);
        Ok(Watch::start(reader, head, endpoint, signed_in))
    }
}

/// A running watch: an endless chunked response of JSON messages, one per line.
pub struct Watch {
    lines: BufReader<BodyReader<BufReader<Stream>>>,
    endpoint: String,
    /// The user and the token the watch was opened with.
    signed_in: Option<(Arc<EtcdAuth>, String)>,
    /// A message read ahead (see [`Watch::peek_first`]), returned next.
    first: Option<WatchMessage>,
}

/// One message of a watch.
#[derive(Debug, Clone, Default)]
pub struct WatchMessage {
    /// The store revision the message speaks for.
    pub revision: i64,
    /// Puts (deletes are left out: nobody we follow deletes what we watch but the trimmer).
    pub puts: Vec<Kv>,
    /// The watch ended: etcd canceled it (e.g. the start revision was compacted).
    pub canceled: Option<String>,
}

impl Watch {
    fn start(
        reader: BufReader<Stream>,
        head: http::ResponseHead,
        endpoint: String,
        signed_in: Option<(Arc<EtcdAuth>, String)>,
    ) -> Watch {
        Watch {
            lines: BufReader::new(BodyReader::new(reader, &head)),
            endpoint,
            signed_in,
            first: None,
        }
    }

    /// Reads the watch's first message (etcd's answer to its creation) ahead; true if etcd
    /// canceled the watch for a stale token.
    fn peek_first(&mut self) -> EtcdResult<bool> {
        let m = self.next_message()?;
        let stale = m
            .canceled
            .as_deref()
            .is_some_and(|r| r.contains("invalid auth token"));
        self.first = Some(m);
        Ok(stale)
    }

    /// The next message; an error ends the watch (reconnect from the last revision seen).
    pub fn next_message(&mut self) -> EtcdResult<WatchMessage> {
        if let Some(m) = self.first.take() {
            return Ok(m);
        }
        let mut line = Vec::new();
        let n = std::io::Read::take(&mut self.lines, ETCD_RESPONSE_BYTES_MAX)
            .read_until(b'\n', &mut line)
            .map_err(|e| unavailable(&self.endpoint, e))?;
        if n == 0 {
            return Err(unavailable(&self.endpoint, "watch stream ended"));
        }
        let v: Value = serde_json::from_slice(&line)
            .map_err(|e| EtcdError::Protocol(format!("watch message: {e}")))?;
        if v.get("error").is_some() {
            if let Some((auth, token)) = &self.signed_in {
                if is_stale_token(503, &v["error"]) {
                    // The next watch signs in again.
                    auth.forget(token);
                }
            }
            return Err(gateway_error(503, &v["error"]));
        }
        let r = &v["result"];
        let mut msg = WatchMessage {
            revision: r["header"]["revision"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            ..WatchMessage::default()
        };
        if r["canceled"].as_bool().unwrap_or(false) {
            let compacted = int(&r["compact_revision"]).unwrap_or(0);
            let reason = r["cancel_reason"].as_str().unwrap_or_default();
            if let Some((auth, token)) = &self.signed_in {
                if reason.contains("invalid auth token") {
                    auth.forget(token);
                }
            }
            msg.canceled = Some(if compacted > 0 {
                format!("revision compacted (up to {compacted})")
            } else {
                format!("canceled: {reason}")
            });
            return Ok(msg);
        }
        for e in r["events"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if e["type"].as_str().unwrap_or("PUT") == "PUT" {
                msg.puts.push(parse_kv(&e["kv"])?);
            }
        }
        Ok(msg)
    }
}

/// One request and its response on `reader`'s connection; (status, body, close after).
fn exchange(
    reader: &mut BufReader<Stream>,
    host: &str,
    path: &str,
    body: &[u8],
    token: Option<&str>,
) -> std::io::Result<(u16, Value, bool)> {
    let headers: &[(&str, &str)] = match token {
        Some(t) => &[("Authorization", t)],
        None => &[],
    };
    http::write_request(reader.get_mut(), "POST", host, path, headers, body)?;
    let head = http::read_head(reader)?;
    let raw = BodyReader::new(reader, &head).read_all(ETCD_RESPONSE_BYTES_MAX)?;
    let value = if raw.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&raw).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not JSON: {e}"))
        })?
    };
    let close = head.close || (!head.chunked && head.content_length.is_none());
    Ok((head.status, value, close))
}

/// A kept connection that turned out closed before our request reached anyone.
fn is_stale(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted
    )
}

/// An error answer of the gateway in our terms.
fn gateway_error(status: u16, v: &Value) -> EtcdError {
    let code = v["code"].as_i64().unwrap_or(0);
    let message = v["message"]
        .as_str()
        .or(v["error"].as_str())
        .unwrap_or("(no message)")
        .to_string();
    // 14 UNAVAILABLE (no leader), 4 DEADLINE_EXCEEDED (request timed out), 10 ABORTED (leader
    // changed): another try, or another member, may do.
    if matches!(code, 4 | 10 | 14) || status == 503 || status == 504 {
        return EtcdError::Unavailable(message);
    }
    if message.contains("compacted") {
        return EtcdError::Compacted(0);
    }
    EtcdError::Refused { code, message }
}

/// A gateway integer (a string for 64-bit fields; absent means 0).
fn int(v: &Value) -> EtcdResult<i64> {
    match v {
        Value::Null => Ok(0),
        Value::String(s) => s
            .parse()
            .map_err(|_| EtcdError::Protocol(format!("{s:?} is not an integer"))),
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| EtcdError::Protocol(format!("{n} is not an integer"))),
        other => Err(EtcdError::Protocol(format!("{other} is not an integer"))),
    }
}

fn bytes(v: &Value) -> EtcdResult<Vec<u8>> {
    match v.as_str() {
        None => Ok(Vec::new()),
        Some(s) => B64
            .decode(s)
            .map_err(|e| EtcdError::Protocol(format!("bad base64: {e}"))),
    }
}

fn header_revision(v: &Value) -> EtcdResult<i64> {
    int(&v["header"]["revision"])
}

fn parse_kv(v: &Value) -> EtcdResult<Kv> {
    Ok(Kv {
        key: bytes(&v["key"])?,
        value: bytes(&v["value"])?,
        create_revision: int(&v["create_revision"])?,
        mod_revision: int(&v["mod_revision"])?,
        version: int(&v["version"])?,
        lease: int(&v["lease"])?,
    })
}

fn parse_range(v: &Value) -> EtcdResult<RangeResult> {
    let kvs = v["kvs"]
        .as_array()
        .map(|a| a.iter().map(parse_kv).collect::<EtcdResult<Vec<_>>>())
        .transpose()?
        .unwrap_or_default();
    Ok(RangeResult {
        revision: header_revision(v)?,
        kvs,
        more: v["more"].as_bool().unwrap_or(false),
    })
}

fn parse_op_result(v: &Value) -> EtcdResult<OpResult> {
    if let Some(r) = v.get("response_range") {
        return parse_range(r).map(OpResult::Range);
    }
    if let Some(d) = v.get("response_delete_range") {
        return Ok(OpResult::Delete {
            deleted: int(&d["deleted"])?,
        });
    }
    Ok(OpResult::Put)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_prefixes() {
        let plain = parse_endpoints("http://127.0.0.1:2379, 10.0.0.1:2379/").unwrap();
        assert_eq!(plain.hosts, ["127.0.0.1:2379", "10.0.0.1:2379"]);
        assert!(!plain.https);
        let tls = parse_endpoints("https://etcd-a:2379,https://[::1]:2379").unwrap();
        assert_eq!((tls.hosts.len(), tls.https), (2, true));
        assert!(
            parse_endpoints("https://h:2379,http://g:2379").is_err(),
            "one scheme"
        );
        assert!(matches!(
            server_name("[::1]:2379"),
            Ok(rustls::pki_types::ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("etcd-a:2379"),
            Ok(rustls::pki_types::ServerName::DnsName(_))
        ));
        assert!(parse_endpoints("").is_err());
        assert!(parse_endpoints("http://h").is_err());
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), [0]);
    }

    #[test]
    fn gateway_errors_are_typed() {
        let v = json!({"error": "etcdserver: no leader", "code": 14});
        assert!(matches!(gateway_error(503, &v), EtcdError::Unavailable(_)));
        let v = json!({"error": "etcdserver: request timed out", "code": 4});
        assert!(matches!(gateway_error(504, &v), EtcdError::Unavailable(_)));
        let v = json!({"error": "illegal base64 data", "code": 3});
        assert!(matches!(
            gateway_error(400, &v),
            EtcdError::Refused { code: 3, .. }
        ));
    }
}
