//! Input the API must refuse, through the real binary: a request whose metadata the journal
//! cannot record fails alone (not its whole group commit), unreadable `If-Match` headers,
//! durations beyond what clients decode, invalid or repeated ACL entries, unbounded lists,
//! stale project tokens, weak credential keys, and 401s that speak in user terms.

mod common;

use std::sync::{Arc, Barrier};

use base64::Engine;
use common::{Client, Server};
use serde_json::{json, Value};

const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6";
const HOST_B: &str = "nqn.2014-08.com.example:host-b";

fn assert_json_error(status: u16, body: &Value, want_status: u16, want_code: u64) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["code"], want_code, "{body}");
    assert!(body["message"].is_string(), "{body}");
    assert_eq!(body["error"], body["message"], "{body}");
}

fn vol(name: &str, acl: &[&str]) -> Value {
    json!({"name": name, "size": "1 GiB", "acl": {"values": acl}, "replicaCount": 1})
}

/// Creates an Available volume in `default`; returns its path.
fn available_volume(s: &Server, name: &str) -> String {
    let (status, v) = s.admin().post(
        "/api/v2/projects/default/volumes",
        &vol(name, &["ALLOW_ANY"]),
    );
    assert_eq!(status, 200, "{v}");
    let path = format!(
        "/api/v2/projects/default/volumes/{}",
        v["UUID"].as_str().unwrap()
    );
    s.wait_for(&path, |_, v| v["state"] == "Available");
    path
}

#[test]
fn an_oversized_request_id_fails_alone_among_concurrent_requests() {
    const CLIENTS: usize = 48;
    const EACH: usize = 6;
    let s = Server::start();
    let start = Arc::new(Barrier::new(CLIENTS + 1));
    let good: Vec<_> = (0..CLIENTS)
        .map(|w| {
            let (c, start) = (s.admin(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                (0..EACH)
                    .map(|i| {
                        let (status, body) =
                            c.post("/api/v2/projects", &json!({"name": format!("p{w}-{i}")}));
                        (status, body.to_string())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let admin = s.admin();
    start.wait();
    let long_id = "r".repeat(2048);
    let (status, err) = admin.send_with_headers(
        "POST",
        "/api/v2/projects",
        Some(&json!({"name": "bad"})),
        &[("x-request-id", long_id.as_bytes())],
    );
    for t in good {
        for (status, body) in t.join().unwrap() {
            assert_eq!(
                status, 200,
                "a good request failed beside the bad one: {body}"
            );
        }
    }
    assert_json_error(status, &err, 400, 3);
    assert_eq!(admin.get("/api/v2/projects/bad").0, 404);
    let (_, list) = admin.get("/api/v2/projects");
    assert_eq!(
        list["projects"].as_array().unwrap().len(),
        2 + CLIENTS * EACH
    );
    let (ok, out) = s.cli(&["journal", "verify"]);
    assert!(ok, "{out}");
}

#[test]
fn strings_that_reach_events_are_bounded_at_the_edge() {
    let s = Server::start();
    let admin = s.admin();
    // The token's subject is every event's actor.
    let long_subject = "s".repeat(300);
    let (ok, token) = s.cli(&[
        "token",
        "create",
        "--role",
        "system:cluster-admin",
        "--subject",
        &long_subject,
    ]);
    assert!(ok);
    let long = admin.with_token(token.trim());
    let (status, err) = long.post("/api/v2/projects", &json!({"name": "p1"}));
    assert_json_error(status, &err, 400, 3);
    assert_eq!(long.get("/api/v2/projects").0, 200, "reads record nothing");
    // A policy scope and a project's default policies are sets, not unbounded lists.
    assert_eq!(
        admin.post("/api/v2/projects", &json!({"name": "p1"})).0,
        200
    );
    let scoped = |scope: Vec<&str>| {
        json!({"name": "q", "qoSRateLimitPolicy": {"projectsNamesScope": scope,
               "limitIOPS": {"writeIOPSLimit": 512, "readIOPSLimit": 512}}})
    };
    let (status, err) = admin.post("/api/v2/policies", &scoped(vec!["p1"; 50_000]));
    assert_json_error(status, &err, 400, 3);
    let (status, err) = admin.post("/api/v2/policies", &scoped(vec!["p1", "default", "p1"]));
    assert_json_error(status, &err, 400, 3);
    assert_eq!(admin.post("/api/v2/policies", &scoped(vec!["p1"])).0, 200);
    let snapshot_default = json!({"policyType": "snapshot",
                                  "policyUUID": "0b1e0b1e-0000-4000-8000-000000000001"});
    let (status, err) = admin.post(
        "/api/v2/projects",
        &json!({"name": "p2", "defaultPolicies": vec![snapshot_default; 2]}),
    );
    assert_json_error(status, &err, 400, 3);
    let (ok, out) = s.cli(&["journal", "verify"]);
    assert!(ok, "{out}");
}

#[test]
fn an_unreadable_if_match_is_400_and_changes_nothing() {
    let s = Server::start();
    let admin = s.admin();
    let path = available_volume(&s, "v");
    let (_, before) = admin.get(&path);
    let grow = json!({"size": "2 GiB"});
    for garbage in [
        &b"abc"[..],
        b"\"12x\"",
        b"W/\"5\"",
        b"1, 2",
        b"-1",
        b"\xff\xfe",
    ] {
        let (status, err) =
            admin.send_with_headers("PUT", &path, Some(&grow), &[("If-Match", garbage)]);
        assert_json_error(status, &err, 400, 3);
        let (status, err) =
            admin.send_with_headers("DELETE", &path, None, &[("If-Match", garbage)]);
        assert_json_error(status, &err, 400, 3);
    }
    assert_eq!(admin.get(&path).1, before, "nothing applied");
    // A stale but readable ETag is a 412; the right one (quoted or not) applies.
    let etag = before["ETag"].as_str().unwrap().to_string();
    let stale = (etag.parse::<u64>().unwrap() - 1).to_string();
    assert_eq!(admin.put_if_match(&path, &grow, &stale).0, 412);
    assert_eq!(
        admin.put_if_match(&path, &grow, &format!("\"{etag}\"")).0,
        200
    );
    assert_eq!(admin.get(&path).1["size"], (2u64 << 30).to_string());

    // Snapshot deletion reads If-Match the same way.
    let vol_uuid = before["UUID"].as_str().unwrap();
    let (status, snap) = admin.post(
        "/api/v2/projects/default/snapshots",
        &json!({"name": "s", "sourceVolumeUUID": vol_uuid}),
    );
    assert_eq!(status, 200, "{snap}");
    let snap_path = format!(
        "/api/v2/projects/default/snapshots/{}",
        snap["UUID"].as_str().unwrap()
    );
    s.wait_for(&snap_path, |_, v| v["state"] == "Available");
    let (status, err) = admin.send_with_headers("DELETE", &snap_path, None, &[("If-Match", b"x")]);
    assert_json_error(status, &err, 400, 3);
    assert_eq!(admin.get(&snap_path).1["state"], "Available");
}

#[test]
fn durations_beyond_what_clients_decode_are_400() {
    let s = Server::start();
    let admin = s.admin();
    let path = available_volume(&s, "v");
    let uuid = admin.get(&path).1["UUID"].as_str().unwrap().to_string();
    let snap = |name: &str, retention: &str| json!({"name": name, "sourceVolumeUUID": uuid, "retentionTime": retention});
    for bad in [
        "99999999999999999999h",
        "315576000001s",
        "87660001h",
        "-1h",
        "1e9s",
    ] {
        let (status, err) = admin.post("/api/v2/projects/default/snapshots", &snap("s", bad));
        assert_json_error(status, &err, 400, 3);
    }
    let (status, created) = admin.post(
        "/api/v2/projects/default/snapshots",
        &snap("s", "315576000000s"),
    );
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["retentionTime"], "315576000000s");
    let (status, created) = admin.post("/api/v2/projects/default/snapshots", &snap("s2", "250ms"));
    assert_eq!(status, 200, "{created}");
    assert_eq!(
        created["retentionTime"], "1s",
        "a short retention is never 0 (forever)"
    );
    let (status, err) = admin.put(
        "/api/v2/clusterConfig/RevivesWindowDuration",
        &json!({"value": "99999999999999999999h"}),
    );
    assert_json_error(status, &err, 400, 3);
}

#[test]
fn acl_entries_must_be_distinct_valid_nqns_and_addresses() {
    let s = Server::start();
    let admin = s.admin();
    let create = |acl: Value, ip: Option<Value>| {
        let mut body =
            json!({"name": "a", "size": "1 GiB", "replicaCount": 1, "acl": {"values": acl}});
        if let Some(ip) = ip {
            body["IPAcl"] = json!({ "values": ip });
        }
        admin.post("/api/v2/projects/default/volumes", &body)
    };
    for acl in [
        json!([format!("{HOST_A}\u{0}")]),
        json!(["nqn.2014-08.org.nvmexpress:uuid:host"]),
        json!(["nqn.x"]),
        json!(["host-a"]),
        json!([format!("nqn.2014-08.com.example:{}", "x".repeat(200))]),
        json!([HOST_A, HOST_B, HOST_A]),
        json!([HOST_A, "ALLOW_ANY"]),
    ] {
        let (status, err) = create(acl.clone(), None);
        assert_json_error(status, &err, 400, 3);
    }
    for ip in [
        json!(["10.0.0.1", "10.0.0.1"]),
        json!(["10.0.0.1", "::ffff:10.0.0.1"]),
        json!(["10.0.0.0/8"]),
        json!(["10.0.0.1\u{0}"]),
        json!(["not-an-ip"]),
    ] {
        let (status, err) = create(json!([HOST_A]), Some(ip.clone()));
        assert_json_error(status, &err, 400, 3);
    }
    let (status, v) = create(
        json!([HOST_A, HOST_B]),
        Some(json!(["10.0.0.1", "fe80::1"])),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["acl"]["values"], json!([HOST_A, HOST_B]));
    let path = format!(
        "/api/v2/projects/default/volumes/{}",
        v["UUID"].as_str().unwrap()
    );
    s.wait_for(&path, |_, v| v["state"] == "Available");
    let (status, err) = admin.put(&path, &json!({"acl": {"values": [HOST_B, HOST_B]}}));
    assert_json_error(status, &err, 400, 3);
    let (status, err) = admin.put(&path, &json!({"IPAcl": {"values": ["1.2.3.4", "1.2.3.4"]}}));
    assert_json_error(status, &err, 400, 3);
    assert_eq!(admin.get(&path).1["acl"]["values"], json!([HOST_A, HOST_B]));
}

/// A fresh RSA key pair of `bits`: (private PKCS#8 PEM, public SPKI PEM).
fn rsa_pair(bits: usize) -> (String, String) {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), bits).expect("rsa key");
    let public = private.to_public_key();
    (
        private
            .to_pkcs8_pem(LineEnding::LF)
            .expect("pem")
            .to_string(),
        public.to_public_key_pem(LineEnding::LF).expect("pem"),
    )
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// An RS256 token for credential `kid` issued at `iat`, expiring at `exp`.
fn sign(private_pem: &str, kid: &str, roles: &[&str], iat: i64, exp: i64) -> String {
    let claims = json!({"sub": "tester", "iss": "tests", "aud": "LightOS", "roles": roles,
                        "iat": iat, "nbf": iat - 60, "exp": exp});
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.into());
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("key");
    jsonwebtoken::encode(&header, &claims, &key).expect("sign")
}

/// Registers a fresh 2048-bit key as credential `system:<id>`; returns its private PEM.
fn system_key(admin: &Client, id: &str) -> String {
    let (private, public) = rsa_pair(2048);
    let payload = base64::engine::general_purpose::STANDARD.encode(public.as_bytes());
    let (status, c) = admin.post(
        "/api/v2/projects/system/credentials",
        &json!({"ID": id, "type": "RS256PubKey", "payload": payload}),
    );
    assert_eq!(status, 200, "{c}");
    private
}

#[test]
fn a_project_token_grants_nothing_once_the_project_is_deleted_and_created_again() {
    let s = Server::start();
    let admin = s.admin();
    let private = system_key(&admin, "issuer");
    assert_eq!(admin.post("/api/v2/projects", &json!({"name": "p"})).0, 200);
    let minted = admin.with_token(&s.token(&["p:admin"]));
    let foreign = admin.with_token(&sign(
        &private,
        "system:issuer",
        &["p:admin"],
        now_secs(),
        now_secs() + 3600,
    ));
    let volumes = "/api/v2/projects/p/volumes";
    assert_eq!(minted.get(volumes).0, 200);
    assert_eq!(foreign.get(volumes).0, 200);

    assert_eq!(admin.delete("/api/v2/projects/p").0, 200);
    assert_eq!(admin.post("/api/v2/projects", &json!({"name": "p"})).0, 200);
    // `evstor token create` bound the token to the old project's UUID.
    let (status, err) = minted.get(volumes);
    assert_json_error(status, &err, 403, 7);
    assert!(
        err["message"].as_str().unwrap().contains("earlier project"),
        "{err}"
    );
    let (status, err) = minted.post(volumes, &vol("v", &["ALLOW_ANY"]));
    assert_json_error(status, &err, 403, 7);
    // A token minted elsewhere has no UUID claim: issued before the re-creation, it is refused.
    let earlier = admin.with_token(&sign(
        &private,
        "system:issuer",
        &["p:admin"],
        now_secs() - 120,
        now_secs() + 3600,
    ));
    assert_eq!(earlier.get(volumes).0, 403);
    // Tokens issued for the new project work.
    assert_eq!(admin.with_token(&s.token(&["p:admin"])).get(volumes).0, 200);
    let fresh = sign(
        &private,
        "system:issuer",
        &["p:viewer"],
        now_secs(),
        now_secs() + 3600,
    );
    assert_eq!(admin.with_token(&fresh).get(volumes).0, 200);
    // Nothing is minted for a project that does not exist.
    let (ok, _) = s.cli(&["token", "create", "--role", "nope:admin"]);
    assert!(!ok, "a token for a missing project was minted");
}

#[test]
fn credential_keys_under_2048_bits_are_400() {
    let s = Server::start();
    let admin = s.admin();
    let (_, weak) = rsa_pair(1024);
    let payload = base64::engine::general_purpose::STANDARD.encode(weak.as_bytes());
    let (status, err) = admin.post(
        "/api/v2/projects/default/credentials",
        &json!({"ID": "weak", "type": "RS256PubKey", "payload": payload}),
    );
    assert_json_error(status, &err, 400, 3);
    assert!(err["message"].as_str().unwrap().contains("2048"), "{err}");
    assert_eq!(
        admin.get("/api/v2/projects/default/credentials/weak").0,
        404
    );
}

#[test]
fn a_401_says_what_is_wrong_in_user_terms() {
    let s = Server::start();
    let admin = s.admin();
    let private = system_key(&admin, "issuer");
    let (other_private, _) = rsa_pair(2048);
    let now = now_secs();
    let good = sign(
        &private,
        "system:issuer",
        &["system:cluster-admin"],
        now,
        now + 3600,
    );
    let forged = sign(
        &other_private,
        "system:issuer",
        &["system:cluster-admin"],
        now,
        now + 3600,
    );
    let mut tampered = good.clone();
    tampered.push('x');
    for (token, want) in [
        ("not-a-jwt".to_string(), "malformed bearer token"),
        (tampered, "malformed bearer token"),
        (forged, "token signature does not verify"),
        (
            sign(
                &private,
                "system:issuer",
                &["system:cluster-admin"],
                now - 7200,
                now - 3600,
            ),
            "token expired",
        ),
        (
            sign(
                &private,
                "system:nope",
                &["system:cluster-admin"],
                now,
                now + 3600,
            ),
            "unknown key id",
        ),
    ] {
        let (status, err) = admin.with_token(&token).get("/api/v2/clusterinfo");
        assert_json_error(status, &err, 401, 16);
        let message = err["message"].as_str().unwrap();
        assert!(message.starts_with(want), "{token}: {message}");
        for internal in ["Base64", "symbol", "offset", "Json", "InvalidToken"] {
            assert!(!message.contains(internal), "{message}");
        }
    }
    assert_eq!(admin.with_token(&good).get("/api/v2/clusterinfo").0, 200);
}
