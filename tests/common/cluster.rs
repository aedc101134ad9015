//! Multi-process clusters on loopback: N etcd members (Debian's `/usr/bin/etcd`) in
//! temporary data directories, and `evstor serve --etcd … --name …` processes joined to
//! them. Every wait is bounded.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use evstor_control::cluster::etcd::{prefix_end, EtcdAuth, EtcdClient, EtcdTls, Range};

#[path = "../../control/tests/certs/mod.rs"]
pub mod certs;

use super::{free_port, Options, Server};

/// Longest an etcd cluster may take to elect a leader.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// etcd's binary (package `etcd-server`).
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// The prefix evstor uses by default.
pub const PREFIX: &str = "/evstor/default/";

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    child: Option<Child>,
}

/// An etcd cluster of loopback members.
pub struct Etcd {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    /// Clients must come over TLS with a certificate this PKI's CA signed.
    pki: Option<certs::TestPki>,
    /// Authentication is on: the test's own looks sign in as root.
    root: Option<Arc<EtcdAuth>>,
}

impl Etcd {
    /// Starts `n` members and waits until they have a leader.
    pub fn start(n: usize) -> Etcd {
        Etcd::start_with(n, false)
    }

    /// As [`Etcd::start`], taking clients over TLS only, each with a client certificate
    /// from the test CA (`--client-cert-auth`); [`member`] gives servers theirs.
    pub fn start_tls(n: usize) -> Etcd {
        Etcd::start_with(n, true)
    }

    fn start_with(n: usize, tls: bool) -> Etcd {
        assert!(
            std::path::Path::new(ETCD_BIN).exists(),
            "{ETCD_BIN} is missing: apt-get install etcd-server"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("e{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data: dir.path().join(format!("e{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("evstor-test-{}", uuid::Uuid::new_v4());
        let pki = tls.then(|| certs::write(dir.path(), "etcd"));
        let mut etcd = Etcd {
            dir,
            members,
            initial_cluster,
            token,
            pki,
            root: None,
        };
        for i in 0..n {
            etcd.spawn(i);
        }
        etcd.wait_ready();
        etcd
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("e{i}.log")))
            .expect("etcd log");
        let m = &self.members[i];
        let client = format!("{}://127.0.0.1:{}", self.scheme(), m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(ETCD_BIN)
            .args(self.pki.as_ref().map(|p| p.etcd_args()).unwrap_or_default())
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .stdout(Stdio::from(log.try_clone().expect("log fd")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    fn scheme(&self) -> &'static str {
        if self.pki.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// `http://127.0.0.1:p1,…` (or `https://`) for `--etcd`.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The arguments a server needs to reach these members over TLS (none without it).
    pub fn tls_args(&self) -> Vec<String> {
        let Some(p) = &self.pki else {
            return Vec::new();
        };
        let path = |f: &PathBuf| f.to_string_lossy().into_owned();
        vec![
            "--etcd-cacert".into(),
            path(&p.ca),
            "--etcd-cert".into(),
            path(&p.client_cert),
            "--etcd-key".into(),
            path(&p.client_key),
        ]
    }

    /// A client of the members (for the test's own looks into etcd).
    pub fn client(&self) -> EtcdClient {
        let c = EtcdClient::new(
            self.members
                .iter()
                .map(|m| format!("127.0.0.1:{}", m.client_port))
                .collect(),
        );
        let c = match &self.pki {
            Some(p) => c.with_tls(
                EtcdTls::new(Some(&p.ca), Some((&p.client_cert, &p.client_key)))
                    .expect("etcd client TLS"),
            ),
            None => c,
        };
        match &self.root {
            Some(root) => c.with_auth(root.clone()),
            None => c,
        }
    }

    /// Turns etcd's authentication on, with a root user and `user`, who may read and write
    /// evstor's prefix and nothing else; returns the path of a file holding `user`'s
    /// password (for `--etcd-password-file`).
    pub fn enable_auth(&mut self, user: &str, password: &str) -> String {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let c = self.client();
        let role = format!("{user}-rw");
        for (path, body) in [
            (
                "/v3/auth/user/add",
                serde_json::json!({"name": "root", "password": "root-pw"}),
            ),
            ("/v3/auth/role/add", serde_json::json!({"name": "root"})),
            (
                "/v3/auth/user/grant",
                serde_json::json!({"user": "root", "role": "root"}),
            ),
            (
                "/v3/auth/user/add",
                serde_json::json!({"name": user, "password": password}),
            ),
            ("/v3/auth/role/add", serde_json::json!({"name": role})),
            (
                "/v3/auth/role/grant",
                serde_json::json!({"name": role, "perm": {
                    "permType": "READWRITE",
                    "key": b64(PREFIX.as_bytes()),
                    "range_end": b64(&prefix_end(PREFIX.as_bytes())),
                }}),
            ),
            (
                "/v3/auth/user/grant",
                serde_json::json!({"user": user, "role": role}),
            ),
            ("/v3/auth/enable", serde_json::json!({})),
        ] {
            c.call(path, &body)
                .unwrap_or_else(|e| panic!("{path}: {e}"));
        }
        self.root = Some(EtcdAuth::new("root", "root-pw"));
        let file = self.dir.path().join(format!("{user}.password"));
        std::fs::write(&file, format!("{password}\n")).expect("password file");
        file.to_string_lossy().into_owned()
    }

    /// Waits until some member reports a raft leader.
    pub fn wait_ready(&self) {
        let c = self.client();
        let deadline = Instant::now() + ETCD_READY_TIMEOUT;
        while c.status().map(|s| s.leader.is_empty()).unwrap_or(true) {
            assert!(Instant::now() < deadline, "etcd has no leader");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL of member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// The value of a key under evstor's prefix.
    pub fn get(&self, rest: &str) -> Option<Vec<u8>> {
        self.client()
            .get(format!("{PREFIX}{rest}").as_bytes())
            .expect("etcd get")
            .map(|kv| kv.value)
    }

    /// How many batches the cluster log holds in etcd now.
    pub fn log_batches(&self) -> usize {
        let mut r = Range::prefix(format!("{PREFIX}log/").as_bytes());
        r.keys_only = true;
        self.client().range(&r).expect("etcd range").kvs.len()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Starts `evstor serve` as member `name` of the cluster on `etcd`, with more `args`.
pub fn member(etcd: &Etcd, name: &str, args: &[&str]) -> Server {
    member_with_env(etcd, name, args, &[])
}

/// As [`member`], with extra environment.
pub fn member_with_env(etcd: &Etcd, name: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
    let mut options = Options::args(args);
    options.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    member_with(etcd, name, options)
}

/// As [`member`], with these options (their arguments follow the cluster's).
pub fn member_with(etcd: &Etcd, name: &str, mut options: Options) -> Server {
    let endpoints = etcd.endpoints();
    let mut all: Vec<String> = ["--etcd", &endpoints, "--name", name]
        .iter()
        .map(|a| a.to_string())
        .collect();
    all.extend(etcd.tls_args());
    all.append(&mut options.args);
    options.args = all;
    Server::start_with(options)
}

/// Every event of a server's journal as JSON (`evstor journal export`).
pub fn events(s: &Server) -> Vec<serde_json::Value> {
    let (ok, out) = s.cli(&["journal", "export"]);
    assert!(ok, "journal export failed: {out}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("an event as JSON"))
        .collect()
}

/// The server (by id) whose leader key etcd holds now.
pub fn leader_id(etcd: &Etcd) -> Option<String> {
    etcd.get("leader")
        .map(|v| String::from_utf8(v).expect("a server id"))
}

/// The server id a member keeps in its data directory.
pub fn server_id(s: &Server) -> String {
    let text = std::fs::read_to_string(s.data_dir().join("server-id")).expect("server-id");
    text.split_whitespace().next().expect("an id").to_string()
}

/// `(seq, hash)` from `evstor journal verify`, which must pass.
pub fn verified_head(s: &Server) -> (u64, String) {
    let (ok, out) = s.cli(&["journal", "verify"]);
    assert!(
        ok,
        "journal verify failed on {}: {out}",
        s.data_dir().display()
    );
    let line = out
        .lines()
        .find(|l| l.starts_with("head: "))
        .unwrap_or_else(|| panic!("no head line: {out}"));
    let parts: Vec<&str> = line.split_whitespace().collect();
    (parts[2].parse().expect("seq"), parts[4].to_string())
}

/// Waits until every server verifies with the same head; returns it.
pub fn same_head(servers: &[&Server], within: Duration) -> (u64, String) {
    let deadline = Instant::now() + within;
    loop {
        let heads: Vec<(u64, String)> = servers.iter().map(|s| verified_head(s)).collect();
        if heads.iter().all(|h| *h == heads[0]) {
            return heads[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the servers did not converge on one head: {heads:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Node uuid → index in `servers` of the server it runs on, from `s`'s nodes API.
pub fn node_owner(s: &Server, servers: &[Server]) -> std::collections::BTreeMap<String, usize> {
    let (_, nodes) = s.admin().get("/api/v2/nodes");
    let ids: Vec<String> = servers.iter().map(server_id).collect();
    nodes["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            let server = n["serverUUID"].as_str().unwrap_or_default();
            let owner = ids
                .iter()
                .position(|i| i == server)
                .expect("a known server");
            (n["UUID"].as_str().unwrap_or_default().to_string(), owner)
        })
        .collect()
}

/// Indexes in `servers` of the servers holding a copy of volume `uuid` (of the default
/// project), primary first, as `servers[ask]` sees it.
pub fn holders(servers: &[Server], ask: usize, uuid: &str) -> Vec<usize> {
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    let v = servers[ask].admin().get(&path).1;
    let owners = node_owner(&servers[ask], servers);
    let owner = |n: &serde_json::Value| n.as_str().and_then(|n| owners.get(n)).copied();
    let mut out: Vec<usize> = owner(&v["primaryNodeUUID"]).into_iter().collect();
    for n in v["nodeList"].as_array().into_iter().flatten() {
        if let Some(i) = owner(n).filter(|i| !out.contains(i)) {
            out.push(i);
        }
    }
    out
}

/// A stopped server's block store.
pub fn open_store(s: &Server) -> std::sync::Arc<evstor_datapath::blockstore::BlockStore> {
    use evstor_datapath::blockstore::{BlockStore, DeviceSpec};
    let dev = s.data_dir().join("devices").join("dev0.img");
    let size = std::fs::metadata(&dev).expect("pool device").len();
    BlockStore::open(
        &s.data_dir().join("blockstore"),
        &[DeviceSpec {
            path: dev,
            size_bytes: size,
        }],
    )
    .expect("open the stopped server's block store")
}

/// Reads `blocks` blocks of image `uuid` from a stopped server's block store.
pub fn image_blocks(s: &Server, uuid: &str, blocks: u64) -> Vec<u8> {
    use evstor_datapath::{IoKind, IoQueue, IoRequest};
    let store = open_store(s);
    let uuid: uuid::Uuid = uuid.parse().expect("uuid");
    let img = store.image(uuid, blocks * 4096, false);
    let mut q = IoQueue::new_sync();
    let mut buf = evstor_datapath::buffer::SlotBuf::new(1, 4096).expect("buffer");
    let mut out = Vec::new();
    for b in 0..blocks {
        let req = IoRequest {
            kind: IoKind::Read,
            offset: b * 4096,
            len: 4096,
            buf: buf.slot_ptr(0),
            tag: 1,
        };
        // SAFETY: the buffer outlives the request, which completes before this returns.
        let res = unsafe { evstor_datapath::backend::run_sync(&img, &mut q, &req) };
        assert_eq!(res.expect("image read"), 4096, "image read");
        out.extend_from_slice(buf.slot(0, 4096));
    }
    out
}
