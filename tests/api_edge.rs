//! The API's network edge against hostile clients: slow bodies from callers who may not use
//! the route, slow headers, idle and never-handshaking connections, the per-address cap,
//! oversized bodies, and a low open files limit. Raw TLS clients on real sockets against the
//! real binary; every deadline is configured short, and `WAIT` (far above them) only turns a
//! server that never acts into a failure instead of a hang.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{Options, Server};
use serde_json::{json, Value};

/// Longest a test waits for the server to answer or to close a connection.
const WAIT: Duration = Duration::from_secs(30);
const P: &str = "/api/v2/projects/default";

/// Accepts the server's self-signed certificate.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

/// What a read found.
#[derive(Debug, PartialEq)]
enum Got {
    Data,
    /// EOF or a reset: the server closed the connection.
    Closed,
    /// Nothing within the read timeout.
    Quiet,
}

/// A raw HTTPS/1.1 connection.
struct Conn {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    /// Bytes read and not consumed yet.
    buf: Vec<u8>,
}

impl Conn {
    /// Connects to the API from 127.0.0.1 and completes the TLS handshake.
    fn open(port: u16) -> Conn {
        let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        Conn::handshake(tcp).expect("TLS handshake")
    }

    /// Completes the TLS handshake on `tcp`; an error if the server closed it instead.
    fn handshake(mut tcp: TcpStream) -> io::Result<Conn> {
        tcp.set_read_timeout(Some(WAIT))?;
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls =
            rustls::ClientConnection::new(client_config(), name).map_err(io::Error::other)?;
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp)?;
        }
        Ok(Conn {
            tls: rustls::StreamOwned::new(tls, tcp),
            buf: Vec::new(),
        })
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tls.write_all(bytes)?;
        self.tls.flush()
    }

    /// One read of whatever arrives within `timeout`.
    fn read_some(&mut self, timeout: Duration) -> Got {
        let _ = self.tls.sock.set_read_timeout(Some(timeout));
        let mut chunk = [0u8; 16 * 1024];
        match self.tls.read(&mut chunk) {
            Ok(0) => Got::Closed,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Got::Data
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Got::Quiet
            }
            Err(_) => Got::Closed,
        }
    }

    /// Reads one response (status, JSON body); panics if none arrives within `WAIT`.
    fn response(&mut self) -> (u16, Value) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(r) = self.take_response() {
                return r;
            }
            assert!(Instant::now() < deadline, "no response within {WAIT:?}");
            match self.read_some(WAIT) {
                Got::Data => {}
                other => panic!(
                    "connection {other:?} before a whole response: {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        }
    }

    /// A whole response at the front of `buf`, consumed.
    fn take_response(&mut self) -> Option<(u16, Value)> {
        let end = self.buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&self.buf[..end]).to_lowercase();
        let status = head.split(' ').nth(1)?.parse().ok()?;
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().expect("content-length"))
            .unwrap_or(0);
        if self.buf.len() < end + length {
            return None;
        }
        let body = serde_json::from_slice(&self.buf[end..end + length]).unwrap_or(Value::Null);
        self.buf.drain(..end + length);
        Some((status, body))
    }

    /// Does the server close this connection within `WAIT` (data before the close is kept)?
    fn closed_by_server(&mut self) -> bool {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match self.read_some(WAIT) {
                Got::Closed => return true,
                Got::Data => {}
                Got::Quiet => return false,
            }
        }
        false
    }
}

/// The head of a request, with a bearer token if any, ending the header block.
fn head(method: &str, path: &str, token: Option<&str>, headers: &str) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}{headers}\r\n")
}

/// A volume creation whose declared 100 000-byte body never finishes.
fn slow_post(port: u16, token: Option<&str>) -> Conn {
    let mut c = Conn::open(port);
    let headers = "Content-Type: application/json\r\nContent-Length: 100000\r\n";
    let req = head("POST", &format!("{P}/volumes"), token, headers) + r#"{"name":"slow"#;
    c.send(req.as_bytes()).expect("send");
    c
}

fn volume(name: &str) -> Value {
    json!({"name": name, "size": "1 GiB", "acl": {"values": ["ALLOW_ANY"]}, "replicaCount": 1})
}

/// The freeze of the hardening issue, scaled down: four in-flight permits, two per subject.
#[test]
fn slow_bodies_cannot_freeze_the_api() {
    let s = Server::start_with(Options::args(&[
        "--api-requests-in-flight-max",
        "4",
        "--api-requests-per-subject-max",
        "2",
        "--api-body-timeout-ms",
        "5000",
    ]));
    let (admin, port) = (s.admin(), s.api_port);
    let viewer = s.token(&["default:viewer"]);
    let project_admin = s.token(&["default:admin"]);

    // A viewer and an anonymous client hold more unfinished POSTs than there are permits...
    let mut refused: Vec<(Conn, u16, u64)> = (0..6)
        .map(|_| (slow_post(port, Some(&viewer)), 403, 7))
        .chain((0..6).map(|_| (slow_post(port, None), 401, 16)))
        .collect();
    // ...and the cluster admin is served.
    assert_eq!(admin.get(&format!("{P}/volumes")).0, 200);
    let (status, body) = admin.post(&format!("{P}/volumes"), &volume("v1"));
    assert_eq!(status, 200, "{body}");
    // They were refused on their headers (their bodies never came), then closed.
    for (c, want, code) in &mut refused {
        let (status, body) = c.response();
        assert_eq!(
            (status, body["code"].as_u64()),
            (*want, Some(*code)),
            "{body}"
        );
        assert!(
            c.closed_by_server(),
            "a refused request's connection stays open"
        );
    }

    // A project admin may create volumes: its slow POSTs take permits, two at most.
    let (tx, rx) = mpsc::channel();
    for _ in 0..4 {
        let mut c = slow_post(port, Some(&project_admin));
        let tx = tx.clone();
        std::thread::spawn(move || {
            let (status, body) = c.response();
            let _ = tx.send((status, body, c.closed_by_server()));
        });
    }
    let mut statuses = Vec::new();
    while statuses.len() < 4 {
        let (status, body, closed) = rx.recv_timeout(WAIT).expect("a slow POST's answer");
        assert!(closed, "{status} {body}: the connection stays open");
        statuses.push(status);
        if status == 429 && statuses.iter().filter(|s| **s == 429).count() == 2 {
            // The other two hold their permits (until the body deadline): the cluster admin
            // still gets through.
            assert_eq!(admin.get(&format!("{P}/volumes")).0, 200);
            let (status, body) = admin.post(&format!("{P}/volumes"), &volume("v2"));
            assert_eq!(status, 200, "{body}");
        }
    }
    statuses.sort();
    // Two refused by the per-subject cap, two cut off by the body deadline.
    assert_eq!(statuses, [408, 408, 429, 429]);
}

#[test]
fn a_header_trickled_slower_than_the_deadline_is_cut_off() {
    let s = Server::start_with(Options::args(&[
        "--api-header-timeout-ms",
        "1000",
        "--api-idle-timeout-ms",
        "600000",
    ]));
    let mut c = Conn::open(s.api_port);
    c.send(b"GET /api/v2/version HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .expect("send");
    let started = Instant::now();
    let closed = loop {
        if started.elapsed() > WAIT {
            break false;
        }
        if c.send(b"a").is_err() {
            break true;
        }
        match c.read_some(Duration::from_millis(100)) {
            Got::Closed => break true,
            Got::Data => panic!("an answer to unfinished headers: {:?}", c.buf),
            Got::Quiet => {}
        }
    };
    assert!(
        closed,
        "a trickling header kept its connection for {WAIT:?}"
    );
    // Clients that send whole requests are served as before.
    assert_eq!(s.anonymous().get("/api/v2/version").0, 200);
}

#[test]
fn idle_connections_are_closed() {
    let s = Server::start_with(Options::args(&[
        "--api-tls-handshake-timeout-ms",
        "1000",
        "--api-idle-timeout-ms",
        "1000",
    ]));
    // A TCP connection that never starts TLS.
    let mut tcp = TcpStream::connect(("127.0.0.1", s.api_port)).expect("connect");
    tcp.set_read_timeout(Some(WAIT)).expect("timeout");
    let n = tcp.read(&mut [0u8; 16]);
    assert!(matches!(n, Ok(0) | Err(_)) && !timed_out(&n), "{n:?}");
    // A TLS connection that never sends a request.
    assert!(Conn::open(s.api_port).closed_by_server());
    // A keep-alive connection serves several requests, then closes once idle.
    let mut c = Conn::open(s.api_port);
    let get = head("GET", "/api/v2/version", None, "");
    for _ in 0..2 {
        c.send(get.as_bytes()).expect("send");
        assert_eq!(c.response().0, 200);
    }
    assert!(
        c.closed_by_server(),
        "an idle keep-alive connection stays open"
    );
}

fn timed_out<T>(r: &io::Result<T>) -> bool {
    matches!(r, Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

/// A TCP connection to the API from `source` (any loopback address).
fn connect_from(source: &str, port: u16) -> TcpStream {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let from: SocketAddr = format!("{source}:0").parse().expect("address");
    sock.bind(&from.into()).expect("bind");
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    sock.connect(&to.into()).expect("connect");
    sock.into()
}

#[test]
fn connections_per_client_address_are_capped() {
    let s = Server::start_with(Options::args(&[
        "--api-connections-per-addr-max",
        "3",
        "--api-idle-timeout-ms",
        "600000",
    ]));
    let port = s.api_port;
    let mut held: Vec<Conn> = (0..3).map(|_| Conn::open(port)).collect();
    // The fourth from 127.0.0.1 is closed before its handshake completes.
    let fourth = Conn::handshake(connect_from("127.0.0.1", port));
    assert!(
        fourth.is_err(),
        "a fourth connection from one address was served"
    );
    // Another address is not affected.
    let mut other = Conn::handshake(connect_from("127.0.0.2", port)).expect("127.0.0.2");
    other
        .send(head("GET", "/api/v2/version", None, "").as_bytes())
        .expect("send");
    assert_eq!(other.response().0, 200);
    // Closing one of the three makes room again.
    held.pop();
    let deadline = Instant::now() + WAIT;
    while Conn::handshake(connect_from("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "no room after a connection closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bodies_over_the_limit_are_refused_with_413() {
    let s = Server::start();
    let token = s.admin_token();
    let limit = evstor_control::limits::REQUEST_BODY_BYTES_MAX;
    // Declared too large: refused on the headers.
    let mut c = Conn::open(s.api_port);
    let headers = format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n",
        limit + 1
    );
    c.send(head("POST", &format!("{P}/volumes"), Some(&token), &headers).as_bytes())
        .expect("send");
    let (status, body) = c.response();
    assert_eq!((status, body["code"].as_u64()), (413, Some(8)), "{body}");
    assert!(body["message"].is_string(), "{body}");
    // Chunked, growing past the limit.
    let mut c = Conn::open(s.api_port);
    let headers = "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n";
    c.send(head("POST", &format!("{P}/volumes"), Some(&token), headers).as_bytes())
        .expect("send");
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..=limit / chunk.len() {
        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
        framed.extend_from_slice(&chunk);
        framed.extend_from_slice(b"\r\n");
        c.send(&framed).expect("send a chunk");
    }
    let (status, body) = c.response();
    assert_eq!((status, body["code"].as_u64()), (413, Some(8)), "{body}");
    // A body within the limit is still read.
    let (status, body) = s.admin().post(&format!("{P}/volumes"), &volume("v1"));
    assert_eq!(status, 200, "{body}");
}

/// An NVMe/TCP ICReq (128-byte PDU: type 0, hlen 128, plen 128, PFV 0, no digests);
/// true if the answer is an ICResp (type 1).
fn nvme_answers_icreq(port: u16) -> bool {
    let mut icreq = [0u8; 128];
    icreq[2] = 128;
    icreq[4..8].copy_from_slice(&128u32.to_le_bytes());
    let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(WAIT));
    let mut icresp = [0u8; 128];
    tcp.write_all(&icreq).is_ok() && tcp.read_exact(&mut icresp).is_ok() && icresp[0] == 1
}

#[test]
fn a_low_open_files_limit_leaves_room_for_nvme_and_the_admin() {
    let s = Server::start_with(Options {
        args: [
            "--api-tls-handshake-timeout-ms",
            "3000",
            "--api-idle-timeout-ms",
            "3000",
        ]
        .map(String::from)
        .to_vec(),
        open_files: Some((256, 256)),
        ..Options::default()
    });
    assert!(
        s.log().contains("API connections at most 64"),
        "{}",
        s.log()
    );
    let pid = s.pid().expect("running");
    let before = open_fds(pid);
    // More idle connections than the process has descriptors.
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(("127.0.0.1", s.api_port)).expect("connect"))
        .collect();
    let most = (0..20)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(25));
            open_fds(pid)
        })
        .max()
        .unwrap_or(0);
    // The API holds at most its share (64 of 256), plus a few transient ones.
    assert!(
        most <= before + 64 + 16,
        "{before} descriptors, then {most}"
    );
    assert!(
        nvme_answers_icreq(s.nvme_port),
        "the NVMe/TCP target starved"
    );
    let admin = s.admin();
    let deadline = Instant::now() + WAIT;
    loop {
        match admin.try_get("/api/v2/clusterinfo") {
            Ok((200, _)) => break,
            other => assert!(
                Instant::now() < deadline,
                "the admin is locked out: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(nvme_answers_icreq(s.nvme_port));
    drop(idle);
}

/// Descriptors open in process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn serve_raises_the_soft_open_files_limit_to_the_hard_one() {
    let s = Server::start_with(Options {
        args: Vec::new(),
        open_files: Some((256, 1024)),
        ..Options::default()
    });
    let pid = s.pid().expect("running");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let figures: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(figures, ["1024", "1024"], "{line}");
    assert!(
        s.log()
            .contains("open files limit raised from 256 to 1024 (hard limit 1024)"),
        "{}",
        s.log()
    );
}

/// An answer given without reading the request's body (a 404 or 405 on a body-carrying
/// request) says `Connection: close`: the server cannot take another request on that socket,
/// and a client that reused it would see its next POST fail with "peer disconnected". An
/// answer after the body was read keeps the connection.
#[test]
fn an_answer_that_leaves_the_body_unread_closes_the_connection() {
    let s = Server::start();
    let c = s.admin();
    let connection = |heads: &[(String, String)]| {
        heads
            .iter()
            .find(|(k, _)| k == "connection")
            .map(|(_, v)| v.clone())
    };
    let (status, _, heads) = c.post_with_headers("/api/v2/nope", &json!({"a": 1}), &[]);
    assert_eq!(status, 404);
    assert_eq!(connection(&heads).as_deref(), Some("close"), "{heads:?}");
    let (status, _, heads) = c.post_with_headers("/api/v2/version", &json!({"a": 1}), &[]);
    assert_eq!(status, 405);
    assert_eq!(connection(&heads).as_deref(), Some("close"), "{heads:?}");
    // Refused by admission, before routing: the body is never read either.
    let anonymous = s.anonymous();
    let (status, _, heads) =
        anonymous.post_with_headers("/api/v2/projects", &json!({"name": "x"}), &[]);
    assert_eq!(status, 401);
    assert_eq!(connection(&heads).as_deref(), Some("close"), "{heads:?}");
    let (status, _, heads) = c.post_with_headers("/api/v2/projects", &json!({"name": "kept"}), &[]);
    assert_eq!(status, 200);
    assert_eq!(connection(&heads), None, "{heads:?}");
}

/// The CPUs a `Cpus_allowed_list` line of `/proc/…/status` names (`0-1,4`).
fn cpu_list(status: &str) -> Vec<usize> {
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.parse().expect("cpu"), b.parse().expect("cpu"));
        cpus.extend(a..=b);
    }
    cpus
}

/// `--datapath-cores 1` on a machine of two CPUs or more: the reactor runs on the first CPU
/// the process may use, and has it to itself: every other thread of the process (the API's,
/// the control plane's, RocksDB's, started before the reactor or after) runs only on the
/// others.
#[test]
fn the_data_paths_cores_are_left_to_its_reactors() {
    let mine = cpu_list(&std::fs::read_to_string("/proc/self/status").expect("status"));
    assert!(
        mine.len() >= 2,
        "this test needs two CPUs (CI's machine has them), not {mine:?}"
    );
    let s = Server::start_with(Options::args(&["--datapath-cores", "1"]));
    let pid = s.pid().expect("running");
    let (mut reactors, mut rocksdb, mut others) = (0, 0, 0);
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(t.path().join("comm")),
            std::fs::read_to_string(t.path().join("status")),
        ) else {
            continue; // ended meanwhile
        };
        let (comm, cpus) = (comm.trim().to_string(), cpu_list(&status));
        if comm.starts_with("nvmf-reactor") {
            reactors += 1;
            assert_eq!(cpus, vec![mine[0]], "{comm} is pinned to the first CPU");
        } else {
            others += 1;
            rocksdb += usize::from(comm.starts_with("rocksdb"));
            assert!(
                !cpus.is_empty() && !cpus.contains(&mine[0]),
                "{comm} may run on the reactor's CPU: {cpus:?}"
            );
        }
    }
    assert_eq!(reactors, 1, "one reactor");
    assert!(
        rocksdb > 0 && others > rocksdb,
        "{others} other threads, {rocksdb} of RocksDB"
    );
}
