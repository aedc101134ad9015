//! Cluster mode: federation settings and root key rotations are journal state, so they reach
//! every member. Two `evstor serve --etcd` processes on one etcd and a real OpenID Connect
//! provider.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{member, Etcd};
use common::oidc::Provider;
use common::{Client, Server};
use serde_json::{json, Value};

/// Longest a change on one server may take to show on another.
const CONVERGE: Duration = Duration::from_secs(30);

/// Polls GET `path` with `c` until `done`.
fn eventually(c: &Client, path: &str, done: impl Fn(u16, &Value) -> bool) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let (status, body) = c.get(path);
        if done(status, &body) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out on {path}: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn admin_file_works_on(s: &Server, on: &Server) -> bool {
    Client::new(on.api_port, Some(s.admin_token()))
        .get("/api/v2/clusterinfo")
        .0
        == 200
}

#[test]
fn federation_and_root_key_rotation_reach_every_member() {
    let etcd = Etcd::start(1);
    let idp = Provider::start();
    let s1 = member(&etcd, "s1", &[]);
    let mut s2 = member(&etcd, "s2", &[]);
    let a1 = s1.admin();
    assert_eq!(a1.post("/api/v2/projects", &json!({"name": "p"})).0, 200);

    // Federation configured on s1 is honoured by s2.
    let idp_body = json!({"name": "test-idp", "idpIssuerURL": idp.issuer});
    assert_eq!(
        a1.post("/api/v2/cluster/IdpConfiguration", &idp_body).0,
        200
    );
    let client = json!({"name": "app", "clientId": "evstor", "idpConfigurationName": "test-idp",
                        "authzMode": "App"});
    assert_eq!(a1.post("/api/v2/cluster/idpClientConfs", &client).0, 200);
    let map = json!({"name": "m", "identifier": "ci-robot", "scope": "p", "role": "viewer",
                     "idpConfigurationName": "test-idp"});
    assert_eq!(a1.post("/api/v2/cluster/authMaps", &map).0, 200);
    assert_eq!(
        a1.post("/api/v2/cluster/federatedAuthentication/enable", &json!({}))
            .0,
        200
    );
    let robot = Client::new(
        s2.api_port,
        Some(idp.token("ci-robot", "evstor", "RS256", 600)),
    );
    eventually(&robot, "/api/v2/projects/p/volumes", |st, _| st == 200);
    assert_eq!(a1.delete("/api/v2/cluster/authMaps/m").0, 200);
    eventually(&robot, "/api/v2/projects/p/volumes", |st, _| st == 403);

    // A rotation on s1 revokes old tokens on s2; s2 rewrites its admin.jwt from etcd.
    let old = s2.admin();
    let (status, rotated) = a1.post("/evstor/v1/rootKey/rotate", &json!({}));
    assert_eq!(status, 200, "{rotated}");
    let fresh = Client::new(
        s2.api_port,
        rotated["adminToken"].as_str().map(str::to_string),
    );
    eventually(&fresh, "/api/v2/clusterinfo", |st, _| st == 200);
    eventually(&old, "/api/v2/clusterinfo", |st, _| st == 401);
    let deadline = Instant::now() + CONVERGE;
    while !(admin_file_works_on(&s2, &s1) && admin_file_works_on(&s1, &s2)) {
        assert!(
            Instant::now() < deadline,
            "admin.jwt files not rewritten with the new key"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A restarted member signs with the new key too.
    s2.restart();
    assert!(admin_file_works_on(&s2, &s1));
    assert_eq!(old.get("/api/v2/clusterinfo").0, 401);
}
