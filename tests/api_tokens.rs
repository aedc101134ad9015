//! End-to-end: token hygiene through the real binary. Root key rotation revokes every token
//! the old key signed; tokens must name the API as `aud` (and the root key's tokens `evstor`
//! as `iss`); `admin.jwt` is short-lived and kept fresh; `evstor token create` mints longer.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Options, Server};
use serde_json::{json, Value};

/// `TOKEN_CLOCK_SKEW_SECS` in `control/src/limits.rs`.
const CLOCK_SKEW_SECS: u64 = 10;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("claims")
}

/// An RS256 token for credential `kid` with the given `iss` and `aud` (`None`: absent).
fn sign(private_pem: &str, kid: &str, iss: Option<&str>, aud: Option<&str>) -> String {
    let now = now_secs();
    let mut claims = json!({"sub": "tester", "roles": ["system:cluster-admin"],
                            "iat": now, "nbf": now - 60, "exp": now + 3600});
    if let Some(iss) = iss {
        claims["iss"] = json!(iss);
    }
    if let Some(aud) = aud {
        claims["aud"] = json!(aud);
    }
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.into());
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("key");
    jsonwebtoken::encode(&header, &claims, &key).expect("sign")
}

/// Polls until `admin.jwt` differs from `old`; returns the new one.
fn wait_new_admin_token(s: &Server, old: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = s.admin_token();
        if now != old && !now.is_empty() {
            return now;
        }
        assert!(Instant::now() < deadline, "admin.jwt was not rewritten");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn rotating_the_root_key_revokes_every_token_the_old_key_signed() {
    let mut s = Server::start();
    assert_eq!(
        s.admin().post("/api/v2/projects", &json!({"name": "p"})).0,
        200
    );
    let old_admin = s.admin();
    let old_viewer = s.client_with_roles(&["p:viewer"]);
    assert_eq!(old_viewer.get("/api/v2/projects/p/volumes").0, 200);
    let old_file = s.admin_token();

    let (status, rotated) = old_admin.post("/evstor/v1/rootKey/rotate", &json!({}));
    assert_eq!(status, 200, "{rotated}");
    let fresh = rotated["adminToken"]
        .as_str()
        .expect("adminToken")
        .to_string();
    let (status, err) = old_admin.get("/api/v2/clusterinfo");
    assert_eq!((status, &err["code"]), (401, &json!(16)), "{err}");
    assert_eq!(old_viewer.get("/api/v2/projects/p/volumes").0, 401);
    let admin = Client::new(s.api_port, Some(fresh.clone()));
    assert_eq!(admin.get("/api/v2/clusterinfo").0, 200);
    // The server rewrites admin.jwt and keys/root.pem: the CLI mints with the new key.
    let file = wait_new_admin_token(&s, &old_file);
    assert_eq!(
        Client::new(s.api_port, Some(file))
            .get("/api/v2/clusterinfo")
            .0,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let viewer = loop {
        let (ok, token) = s.cli(&["token", "create", "--role", "p:viewer"]);
        if ok {
            break Client::new(s.api_port, Some(token.trim().to_string()));
        }
        assert!(
            Instant::now() < deadline,
            "token create never worked after rotation"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(viewer.get("/api/v2/projects/p/volumes").0, 200);
    // Only cluster admins rotate; and it is in the journal and survives a restart.
    assert_eq!(viewer.post("/evstor/v1/rootKey/rotate", &json!({})).0, 403);
    let (ok, exported) = s.cli(&["journal", "export"]);
    assert!(ok && exported.contains("RootKeyRotated"));
    s.restart();
    assert_eq!(
        Client::new(s.api_port, Some(fresh))
            .get("/api/v2/clusterinfo")
            .0,
        200
    );
    assert_eq!(old_admin.get("/api/v2/clusterinfo").0, 401);
    assert_eq!(s.admin().get("/api/v2/clusterinfo").0, 200);
    let (ok, out) = s.cli(&["journal", "verify"]);
    assert!(ok, "{out}");
}

#[test]
fn tokens_must_name_this_api_as_audience_and_root_tokens_evstor_as_issuer() {
    let s = Server::start();
    let root = std::fs::read_to_string(s.data_dir().join("keys/root.pem")).expect("root key");
    let get = |token: String| {
        Client::new(s.api_port, Some(token))
            .get("/api/v2/clusterinfo")
            .0
    };
    assert_eq!(
        get(sign(&root, "system:root", Some("evstor"), Some("LightOS"))),
        200
    );
    assert_eq!(
        get(sign(&root, "system:root", Some("evstor"), None)),
        401,
        "no aud"
    );
    assert_eq!(
        get(sign(&root, "system:root", Some("evstor"), Some("other"))),
        401,
        "wrong aud"
    );
    assert_eq!(
        get(sign(&root, "system:root", None, Some("LightOS"))),
        401,
        "no iss"
    );
    assert_eq!(
        get(sign(&root, "system:root", Some("tests"), Some("LightOS"))),
        401,
        "wrong iss"
    );
    // What evstor mints carries both.
    let minted = claims(&s.admin_token());
    assert_eq!(
        (&minted["iss"], &minted["aud"]),
        (&json!("evstor"), &json!("LightOS"))
    );
}

#[test]
fn the_admin_token_is_short_lived_and_kept_fresh_and_token_create_mints_longer() {
    let default = Server::start();
    let c = claims(&default.admin_token());
    let lifetime = c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap();
    assert_eq!(lifetime, 24 * 3600, "a day by default");
    let (ok, long) = default.cli(&[
        "token",
        "create",
        "--role",
        "system:cluster-admin",
        "--lifetime",
        "7776000",
    ]);
    assert!(ok);
    let c = claims(long.trim());
    assert_eq!(
        c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
        7_776_000
    );
    let (ok, _) = default.cli(&[
        "token",
        "create",
        "--role",
        "system:cluster-admin",
        "--lifetime",
        "99999999999",
    ]);
    assert!(!ok, "longer than the longest lifetime");
    drop(default);

    let s = Server::start_with(Options::args(&["--admin-token-lifetime", "4"]));
    let first = s.admin_token();
    let c = claims(&first);
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 4);
    // Rewritten at half-life; the new one works.
    let second = wait_new_admin_token(&s, &first);
    assert_eq!(
        Client::new(s.api_port, Some(second))
            .get("/api/v2/clusterinfo")
            .0,
        200
    );
    // The first one expires.
    let exp = c["exp"].as_u64().unwrap();
    while now_secs() <= exp + CLOCK_SKEW_SECS + 1 {
        std::thread::sleep(Duration::from_millis(250));
    }
    let (status, err) = Client::new(s.api_port, Some(first)).get("/api/v2/clusterinfo");
    assert_eq!(status, 401, "{err}");
}
