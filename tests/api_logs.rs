//! `GET /api/v2/logs` (the support bundle) and the server's own logs: the bundle holds the
//! version, config, cluster state, `journal verify`, RocksDB and block store statistics, the
//! metrics (unless `SkipStatistics`) and the log files of the last `NumOfDaysToCollectLogs`
//! days; it is for cluster admins only and holds no key, token or certificate. With
//! `--log-format json` the log file is JSON lines, and a request's `x-request-id` is the one
//! in its log lines, its answer and its journal events.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, SystemTime};

use common::{Options, Server};
use serde_json::{json, Value};

/// The archive's files by their path below the bundle's top directory.
fn entries(tar_bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut out = BTreeMap::new();
    for entry in archive.entries().expect("a tar archive") {
        let mut entry = entry.expect("an entry");
        let path = entry.path().expect("a path").to_string_lossy().into_owned();
        let (_, inner) = path.split_once('/').expect("under a top directory");
        let inner = inner.to_string();
        let mut body = Vec::new();
        entry.read_to_end(&mut body).expect("entry data");
        out.insert(inner, body);
    }
    out
}

fn header<'a>(heads: &'a [(String, String)], name: &str) -> &'a str {
    heads
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// The base64 body of a PEM file (what would leak if the file were copied in).
fn pem_body(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect()
}

#[test]
fn the_support_bundle_holds_what_support_needs_and_no_secret() {
    let s = Server::start();
    let admin = s.admin();
    // A rotated log file from five days ago: outside the default two days.
    let old = s.data_dir().join("logs").join("evstor.log.7");
    std::fs::write(&old, "an old line\n").expect("old log");
    let five_days = SystemTime::now() - Duration::from_secs(5 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .and_then(|f| f.set_modified(five_days))
        .expect("age the old log");
    let (status, _) = admin.post(
        "/api/v2/projects/default/volumes",
        &json!({"name": "b1", "size": "8 MiB", "acl": {"values": ["ALLOW_ANY"]}, "replicaCount": 1}),
    );
    assert_eq!(status, 200);

    assert_eq!(
        s.client_with_roles(&["default:admin"])
            .get("/api/v2/logs")
            .0,
        403
    );
    assert_eq!(s.anonymous().get("/api/v2/logs").0, 401);
    assert_eq!(admin.get("/api/v2/logs?LogFilename=../x").0, 400);
    assert_eq!(admin.get("/api/v2/logs?NumOfDaysToCollectLogs=x").0, 400);

    let (status, heads, gz) = admin.get_bytes("/api/v2/logs?LogFilename=case-42");
    assert_eq!(status, 200);
    assert_eq!(header(&heads, "content-type"), "application/gzip");
    assert!(
        header(&heads, "content-disposition").contains("case-42-"),
        "{heads:?}"
    );
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut tar_bytes)
        .expect("gzip");
    let files = entries(&tar_bytes);
    let text = |name: &str| {
        String::from_utf8_lossy(
            files
                .get(name)
                .unwrap_or_else(|| panic!("no {name}: {:?}", files.keys())),
        )
        .into_owned()
    };
    assert!(text("version.txt").contains(env!("CARGO_PKG_VERSION")));
    assert!(
        text("journal-verify.txt").contains("journal verify: OK"),
        "{}",
        text("journal-verify.txt")
    );
    assert!(
        text("cluster.json").contains("\"b1\""),
        "the volume is in the state"
    );
    assert!(text("config.json").contains(&s.api_port.to_string()));
    assert!(
        text("journal-rocksdb-stats.txt").contains("Compaction"),
        "RocksDB stats"
    );
    assert!(text("blockstore.txt").contains("pool: capacity"));
    assert!(text("metrics.txt").contains("evstor_volumes{state="));
    assert!(files.contains_key("logs/evstor.log"), "{:?}", files.keys());
    assert!(
        !files.contains_key("logs/evstor.log.7"),
        "older than two days"
    );

    // No secret: not the admin token, the root key, the TLS key or the credentials' keys.
    let haystack = String::from_utf8_lossy(&tar_bytes).into_owned();
    let token = s.admin_token();
    let signature = token.rsplit('.').next().expect("a JWT");
    assert!(
        !haystack.contains(signature),
        "the admin token is in the bundle"
    );
    for pem in [
        s.data_dir().join("keys/root.pem"),
        s.data_dir().join("tls/key.pem"),
    ] {
        let body = pem_body(&pem);
        assert!(
            !haystack.contains(&body[..64]),
            "{} is in the bundle",
            pem.display()
        );
    }
    assert!(!haystack.contains("BEGIN"), "PEM material in the bundle");

    // Options: no statistics, no compression, more days.
    let (status, heads, tar_bytes) = admin.get_bytes(
        "/api/v2/logs?SkipStatistics=true&DontCompressOutput=true&NumOfDaysToCollectLogs=7",
    );
    assert_eq!(status, 200);
    assert_eq!(header(&heads, "content-type"), "application/x-tar");
    let files = entries(&tar_bytes);
    assert!(!files.contains_key("metrics.txt"));
    assert!(
        files.contains_key("logs/evstor.log.7"),
        "{:?}",
        files.keys()
    );
}

#[test]
fn json_logs_carry_the_request_id_the_journal_records() {
    let s = Server::start_with(Options {
        args: vec!["--log-format".into(), "json".into()],
        env: vec![("EVSTOR_LOG".into(), "info,evstor_control=debug".into())],
        ..Options::default()
    });
    let id = "support-case-7f3a";
    let (status, body, heads) = s.admin().post_with_headers(
        "/api/v2/projects",
        &json!({"name": "logged"}),
        &[("x-request-id", id)],
    );
    assert!(status == 200 || status == 201, "{status} {body}");
    assert_eq!(header(&heads, "x-request-id"), id);
    // An answer without a given id gets a fresh one.
    let (_, _, heads) =
        s.admin()
            .post_with_headers("/api/v2/projects", &json!({"name": "logged-2"}), &[]);
    assert_eq!(header(&heads, "x-request-id").len(), 36, "{heads:?}");

    let (ok, export) = s.cli(&["journal", "export"]);
    assert!(ok, "{export}");
    assert!(
        export
            .lines()
            .any(|l| l.contains("ProjectCreated") && l.contains(id)),
        "the journal names the request id:\n{export}"
    );
    let log = std::fs::read_to_string(s.data_dir().join("logs/evstor.log")).expect("log file");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l.to_string().contains(id)),
        "no log line names {id}:\n{log}"
    );
}
