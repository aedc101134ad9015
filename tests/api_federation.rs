//! End-to-end: federated authentication against a real OpenID Connect provider
//! (`oidc-provider` under node, [`common::oidc`]) and the real binary. IdP configuration,
//! client configuration and auth maps through the API; the IdP's access tokens accepted by
//! its JWKS, with issuer, audience and expiry checked and roles from the auth maps only.

mod common;

use common::oidc::Provider;
use common::{Client, Server};
use serde_json::{json, Value};

const IDP: &str = "/api/v2/cluster/IdpConfiguration";
const CLIENTS: &str = "/api/v2/cluster/idpClientConfs";
const MAPS: &str = "/api/v2/cluster/authMaps";
/// `TOKEN_CLOCK_SKEW_SECS` in `control/src/limits.rs`: an expired token is refused this much
/// after its `exp`.
const CLOCK_SKEW_SECS: u64 = 10;

fn vol(name: &str) -> Value {
    json!({"name": name, "size": "1 GiB", "acl": {"values": ["ALLOW_ANY"]}, "replicaCount": 1})
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A claim of a JWT, read without verifying it.
fn claim(token: &str, name: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice::<Value>(&bytes).expect("claims")[name].clone()
}

/// Configures `idp` (issuer of `provider`), a client configuration accepting audience
/// `evstor` in App mode, and the map `robot-p`: client `ci-robot` → `p:viewer`.
fn configure(admin: &Client, provider: &Provider) {
    let body = json!({"name": "test-idp", "idpIssuerURL": provider.issuer});
    let (status, created) = admin.post(IDP, &body);
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["idpIssuerURL"], provider.issuer.as_str());
    let body = json!({"name": "evstor-app", "clientId": "evstor",
                      "idpConfigurationName": "test-idp", "authzMode": "App"});
    let (status, created) = admin.post(CLIENTS, &body);
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["authzMode"], "App");
    let (status, created) = admin.post(MAPS, &robot_map());
    assert_eq!(status, 200, "{created}");
}

fn robot_map() -> Value {
    json!({"name": "robot-p", "identifier": "ci-robot", "scope": "p", "role": "viewer",
           "idpConfigurationName": "test-idp"})
}

fn enable(admin: &Client, on: bool) {
    let verb = if on { "enable" } else { "disable" };
    let path = format!("/api/v2/cluster/federatedAuthentication/{verb}");
    assert_eq!(admin.post(&path, &json!({})), (200, json!({})));
}

#[test]
fn an_idp_token_mapped_to_a_project_viewer_reads_that_project_and_nothing_else() {
    let idp = Provider::start();
    let stranger = Provider::start();
    let mut s = Server::start();
    let admin = s.admin();
    for p in ["p", "q"] {
        assert_eq!(admin.post("/api/v2/projects", &json!({"name": p})).0, 200);
        let (status, v) = admin.post(&format!("/api/v2/projects/{p}/volumes"), &vol("v"));
        assert_eq!(status, 200, "{v}");
    }
    let token = idp.token("ci-robot", "evstor", "RS256", 600);
    let robot = Client::new(s.api_port, Some(token.clone()));
    let p_volumes = "/api/v2/projects/p/volumes";
    assert_eq!(robot.get(p_volumes).0, 401, "no IdP configured yet");

    configure(&admin, &idp);
    let (status, err) = robot.get(p_volumes);
    assert_eq!(status, 401, "federation is still disabled: {err}");
    enable(&admin, true);
    let (status, list) = robot.get(p_volumes);
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["volumes"].as_array().map(Vec::len), Some(1), "{list}");
    // Nothing else: another project, a change in p, cluster resources.
    assert_eq!(robot.get("/api/v2/projects/q/volumes").0, 403);
    assert_eq!(robot.post(p_volumes, &vol("w")).0, 403);
    assert_eq!(robot.get("/api/v2/featureFlags").0, 403);
    assert_eq!(robot.get(MAPS).0, 403);
    assert_eq!(robot.post(MAPS, &robot_map()).0, 403);
    // Keys of every kind the JWKS publishes verify (an ES256 token).
    let es = Client::new(
        s.api_port,
        Some(idp.token("ci-robot", "evstor", "ES256", 600)),
    );
    assert_eq!(es.get(p_volumes).0, 200);
    // An IdP client without a map is authenticated and has no role.
    let other = Client::new(
        s.api_port,
        Some(idp.token("other-app", "evstor", "RS256", 600)),
    );
    assert_eq!(other.get(p_volumes).0, 403);

    // Refused: wrong audience, wrong issuer, expired.
    let wrong_aud = Client::new(
        s.api_port,
        Some(idp.token("ci-robot", "not-evstor", "RS256", 600)),
    );
    let (status, err) = wrong_aud.get(p_volumes);
    assert_eq!(status, 401, "{err}");
    let wrong_iss = Client::new(
        s.api_port,
        Some(stranger.token("ci-robot", "evstor", "RS256", 600)),
    );
    let (status, err) = wrong_iss.get(p_volumes);
    assert_eq!(status, 401, "{err}");
    let short = idp.token("ci-robot", "evstor", "RS256", 1);
    let short_client = Client::new(s.api_port, Some(short.clone()));
    assert_eq!(short_client.get(p_volumes).0, 200, "valid until it expires");
    let exp = claim(&short, "exp").as_u64().expect("exp");
    while now_secs() <= exp + CLOCK_SKEW_SECS + 1 {
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let (status, err) = short_client.get(p_volumes);
    assert_eq!(status, 401, "expired: {err}");

    // Deleting the map revokes the role at once; mapping again restores it.
    assert_eq!(admin.delete(&format!("{MAPS}/robot-p")), (200, json!({})));
    assert_eq!(robot.get(p_volumes).0, 403);
    assert_eq!(admin.post(MAPS, &robot_map()).0, 200);
    assert_eq!(robot.get(p_volumes).0, 200);
    // Disabling federation refuses every IdP token; the admin's own token still works.
    enable(&admin, false);
    assert_eq!(robot.get(p_volumes).0, 401);
    assert_eq!(es.get(p_volumes).0, 401);
    assert_eq!(admin.get(p_volumes).0, 200);
    enable(&admin, true);
    assert_eq!(robot.get(p_volumes).0, 200);

    // Every change is in the journal; replay reproduces the state, and a restart keeps it.
    let (ok, exported) = s.cli(&["journal", "export"]);
    assert!(ok);
    for event in [
        "IdpConfigurationCreated",
        "IdpClientConfCreated",
        "AuthMapEntryCreated",
        "AuthMapEntryDeleted",
        "FederatedAuthenticationEnabled",
        "FederatedAuthenticationDisabled",
    ] {
        assert!(exported.contains(event), "{event} missing from the journal");
    }
    s.restart();
    let (ok, out) = s.cli(&["journal", "verify"]);
    assert!(ok, "{out}");
    let robot = Client::new(s.api_port, Some(token));
    assert_eq!(robot.get(p_volumes).0, 200, "after restart");
    assert_eq!(robot.get("/api/v2/projects/q/volumes").0, 403);
    let admin = s.admin();
    let (_, maps) = admin.get(MAPS);
    assert_eq!(
        maps["authMapEntries"][0]["identifier"], "ci-robot",
        "{maps}"
    );
    let (_, info) = admin.get("/api/v2/cluster");
    assert_eq!(
        info["federatedAuthenticationStatus"]["federatedAuthenticationEnabled"], true,
        "{info}"
    );
}

#[test]
fn federation_resources_are_validated_and_cluster_admin_only() {
    let idp = Provider::start();
    let s = Server::start();
    let admin = s.admin();
    assert_eq!(admin.post("/api/v2/projects", &json!({"name": "p"})).0, 200);
    // Enabling needs an IdP.
    let (status, err) = admin.post("/api/v2/cluster/federatedAuthentication/enable", &json!({}));
    assert!(status == 400 || status == 412, "{status} {err}");
    // Plain http off loopback would let anyone on the path swap the IdP's keys.
    let bad = json!({"name": "x", "idpIssuerURL": "http://idp.example.com"});
    assert_eq!(admin.post(IDP, &bad).0, 400);
    configure(&admin, &idp);
    assert_eq!(
        admin
            .post(
                IDP,
                &json!({"name": "test-idp", "idpIssuerURL": idp.issuer})
            )
            .0,
        409
    );
    let bad_role = json!({"name": "m", "identifier": "x", "scope": "p", "role": "owner",
                          "idpConfigurationName": "test-idp"});
    assert_eq!(admin.post(MAPS, &bad_role).0, 400);
    let no_idp = json!({"name": "m", "identifier": "x", "scope": "p", "role": "viewer",
                        "idpConfigurationName": "nope"});
    assert_eq!(admin.post(MAPS, &no_idp).0, 404);
    // An IdP in use cannot be deleted.
    let (status, err) = admin.delete(&format!("{IDP}/test-idp"));
    assert!(status == 400 || status == 412, "{status} {err}");
    // Lists and gets.
    assert_eq!(
        admin.get(IDP).1["idpConfigurations"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        admin.get(&format!("{CLIENTS}/evstor-app")).1["clientId"],
        "evstor"
    );
    assert_eq!(admin.get(&format!("{MAPS}/robot-p")).1["scope"], "p");
    assert_eq!(admin.get(&format!("{MAPS}/nope")).0, 404);
    // Project admins and viewers see none of it.
    let p_admin = s.client_with_roles(&["p:admin"]);
    for path in [IDP, CLIENTS, MAPS] {
        assert_eq!(p_admin.get(path).0, 403, "{path}");
    }
    assert_eq!(
        p_admin
            .post("/api/v2/cluster/federatedAuthentication/enable", &json!({}))
            .0,
        403
    );
    assert_eq!(s.anonymous().get(MAPS).0, 401);
}

#[test]
fn an_idp_behind_a_proxy_is_reached_through_it() {
    let idp = Provider::start();
    let s = Server::start();
    let admin = s.admin();
    assert_eq!(admin.post("/api/v2/projects", &json!({"name": "p"})).0, 200);
    configure(&admin, &idp);
    let body = json!({"name": "test-idp", "proxyInfo": {"URL": idp.proxy}});
    let (status, updated) = admin.put(IDP, &body);
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["proxyInfo"]["URL"], idp.proxy.as_str());
    enable(&admin, true);
    let before = idp.stats()["proxied"].as_u64().unwrap_or(0);
    let robot = Client::new(
        s.api_port,
        Some(idp.token("ci-robot", "evstor", "RS256", 600)),
    );
    assert_eq!(robot.get("/api/v2/projects/p/volumes").0, 200);
    let after = idp.stats()["proxied"].as_u64().unwrap_or(0);
    assert!(
        after > before,
        "discovery and JWKS went through the proxy: {before} -> {after}"
    );
}

#[test]
fn user_mode_roles_come_from_the_subject_groups_and_the_configured_claim() {
    let idp = Provider::start();
    let s = Server::start();
    let admin = s.admin();
    for p in ["p", "q", "r"] {
        assert_eq!(admin.post("/api/v2/projects", &json!({"name": p})).0, 200);
    }
    configure(&admin, &idp);
    // Tokens with audience evstor-ui: identifiers are sub, groups and `department`.
    let body = json!({"name": "evstor-ui", "clientId": "evstor-ui",
                      "idpConfigurationName": "test-idp", "authzMode": "User",
                      "claimName": "department"});
    assert_eq!(admin.post(CLIENTS, &body).0, 200);
    for (name, identifier, scope, role) in [
        ("by-sub", "alice", "p", "viewer"),
        ("by-group", "ops", "q", "admin"),
        ("by-claim", "storage", "r", "viewer"),
    ] {
        let body = json!({"name": name, "identifier": identifier, "scope": scope,
                          "role": role, "idpConfigurationName": "test-idp"});
        assert_eq!(admin.post(MAPS, &body).0, 200, "{name}");
    }
    enable(&admin, true);
    // alice (groups ops, everyone; department storage) in User mode.
    let alice = Client::new(
        s.api_port,
        Some(idp.token("alice", "evstor-ui", "RS256", 600)),
    );
    assert_eq!(alice.get("/api/v2/projects/p/volumes").0, 200, "by sub");
    assert_eq!(
        alice.post("/api/v2/projects/p/volumes", &vol("a")).0,
        403,
        "p: viewer"
    );
    assert_eq!(
        alice.post("/api/v2/projects/q/volumes", &vol("a")).0,
        200,
        "by group"
    );
    assert_eq!(
        alice.get("/api/v2/projects/r/volumes").0,
        200,
        "by the configured claim"
    );
    // Changing the claim name drops the roles it gave.
    let (status, updated) = admin.put(
        &format!("{CLIENTS}/evstor-ui"),
        &json!({"name": "evstor-ui", "claimName": "team"}),
    );
    assert_eq!(status, 200, "{updated}");
    assert_eq!(alice.get("/api/v2/projects/r/volumes").0, 403);
    // Another user of the same IdP, in none of those groups: nothing.
    let other = Client::new(
        s.api_port,
        Some(idp.token("other-app", "evstor-ui", "RS256", 600)),
    );
    assert_eq!(other.get("/api/v2/projects/q/volumes").0, 403);
}

/// The `kid` of a JWT's header.
fn kid(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .expect("base64url");
    serde_json::from_slice::<Value>(&bytes).expect("header")["kid"]
        .as_str()
        .expect("kid")
        .to_string()
}

#[test]
fn an_idp_key_rotation_is_picked_up_by_fetching_its_keys_again() {
    let first = Provider::start();
    let s = Server::start();
    let admin = s.admin();
    assert_eq!(admin.post("/api/v2/projects", &json!({"name": "p"})).0, 200);
    configure(&admin, &first);
    enable(&admin, true);
    let path = "/api/v2/projects/p/volumes";
    let old_token = first.token("ci-robot", "evstor", "RS256", 600);
    let old_kid = kid(&old_token);
    let old = Client::new(s.api_port, Some(old_token));
    assert_eq!(old.get(path).0, 200);
    // The IdP restarts with fresh keys under the same issuer.
    let (issuer, port) = (first.issuer.clone(), first.port());
    drop(first);
    let second = Provider::start_on(port);
    assert_eq!(second.issuer, issuer);
    let token = second.token("ci-robot", "evstor", "RS256", 600);
    assert_ne!(kid(&token), old_kid);
    // An unknown kid makes evstor fetch the keys again (at most every 10 s per IdP).
    let new = Client::new(s.api_port, Some(token));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        let (status, body) = new.get(path);
        if status == 200 {
            break;
        }
        assert_eq!(status, 401, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "the new key was never fetched: {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(
        second.stats()["jwks"].as_u64().unwrap_or(0) >= 1,
        "fetched from the new IdP"
    );
    // The withdrawn key no longer verifies.
    assert_eq!(old.get(path).0, 401);
}

#[test]
fn tokens_naming_unknown_keys_cannot_make_evstor_hammer_the_idp() {
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    let idp = Provider::start();
    let s = Server::start();
    let admin = s.admin();
    assert_eq!(admin.post("/api/v2/projects", &json!({"name": "p"})).0, 200);
    configure(&admin, &idp);
    enable(&admin, true);
    let path = "/api/v2/projects/p/volumes";
    let good = Client::new(
        s.api_port,
        Some(idp.token("ci-robot", "evstor", "RS256", 600)),
    );
    assert_eq!(good.get(path).0, 200);
    // Forged tokens: the IdP's issuer and our audience, signed by a key of our own under a
    // fresh key id each time, so every one names a key the cache lacks.
    let forger = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("rsa key");
    let pem = forger.to_pkcs8_pem(LineEnding::LF).expect("pem");
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).expect("key");
    let before = idp.stats()["jwks"].as_u64().expect("jwks count");
    let started = std::time::Instant::now();
    const FORGED: u64 = 40;
    for i in 0..FORGED {
        let now = now_secs();
        let claims = json!({"iss": idp.issuer, "aud": "evstor", "sub": "x", "client_id": "ci-robot",
                            "iat": now, "exp": now + 600});
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(format!("forged-{i}"));
        let token = jsonwebtoken::encode(&header, &claims, &key).expect("sign");
        let (status, err) = Client::new(s.api_port, Some(token)).get(path);
        assert_eq!(status, 401, "{err}");
    }
    let elapsed = started.elapsed().as_secs();
    let fetched = idp.stats()["jwks"].as_u64().expect("jwks count") - before;
    // At most one fetch per JWKS_REFRESH_MIN_INTERVAL_MS (10 s) per IdP, whatever arrives.
    assert!(
        fetched <= 1 + elapsed / 10,
        "{FORGED} unknown key ids in {elapsed} s made {fetched} JWKS fetches"
    );
    assert_eq!(good.get(path).0, 200, "the IdP's real tokens still verify");
}
