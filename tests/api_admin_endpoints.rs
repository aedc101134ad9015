//! End-to-end: admin endpoints (the ports and addresses the API serves on) changed live
//! through the API of the real binary: the new socket is bound before the old one goes, a
//! change that would lock the caller out is refused, and the set survives a restart.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{free_port, Client, Server};
use serde_json::{json, Value};

const ENDPOINTS: &str = "/api/v2/adminEndpoints";

/// Whether something accepts TCP connections on loopback `port`.
fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Waits until `port` stops accepting connections (a bound: the test fails instead of
/// hanging if it never does).
fn wait_closed(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while listening(port) {
        assert!(
            Instant::now() < deadline,
            "port {port} still accepts connections"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ports(list: &Value) -> Vec<u64> {
    list["adminEndpoints"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["port"].as_u64()).collect())
        .unwrap_or_default()
}

#[test]
fn moving_the_api_to_another_port_serves_there_closes_the_old_one_and_survives_restart() {
    let mut s = Server::start();
    let old = s.api_port;
    let admin = s.admin();
    let (status, list) = admin.get(ENDPOINTS);
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        list["adminEndpoints"][0]["ips"],
        json!(["127.0.0.1"]),
        "{list}"
    );
    assert_eq!(
        ports(&list),
        [u64::from(old)],
        "--api-addr until something is recorded"
    );

    let new = free_port();
    let (status, created) = admin.post(ENDPOINTS, &json!({"port": new, "ips": ["127.0.0.1"]}));
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["port"], new);
    // Both serve now: the new socket was bound before anything else changed.
    let on_new = Client::new(new, Some(s.admin_token()));
    assert_eq!(on_new.get("/api/v2/clusterinfo").0, 200);
    assert_eq!(admin.get("/api/v2/clusterinfo").0, 200);
    let (_, info) = on_new.get("/api/v2/clusterinfo");
    let api = info["apiEndpoints"].to_string();
    assert!(api.contains(&format!(":{new}")), "{info}");

    // Releasing the old port (asked on the old port itself): it closes, the new one serves.
    let (status, deleted) = admin.delete(&format!("{ENDPOINTS}/{old}"));
    assert_eq!(status, 200, "{deleted}");
    wait_closed(old);
    assert_eq!(on_new.get("/api/v2/clusterinfo").0, 200);
    let (_, list) = on_new.get(ENDPOINTS);
    assert_eq!(ports(&list), [u64::from(new)]);

    // Refused, nothing changed: the last endpoint, and a move to an address this machine
    // does not have (it cannot be bound; the caller would be locked out).
    let (status, err) = on_new.delete(&format!("{ENDPOINTS}/{new}"));
    assert_eq!((status, &err["code"]), (400, &json!(9)), "{err}");
    let (status, err) = on_new.put(
        &format!("{ENDPOINTS}/{new}"),
        &json!({"port": new, "ips": ["192.0.2.1"]}),
    );
    assert_eq!(status, 400, "{err}");
    // Bindable, but not where this caller came in: refused too.
    let (status, err) = on_new.put(
        &format!("{ENDPOINTS}/{new}"),
        &json!({"port": new, "ips": ["127.0.0.2"]}),
    );
    assert_eq!((status, &err["code"]), (400, &json!(9)), "{err}");
    assert_eq!(on_new.get("/api/v2/clusterinfo").0, 200);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let held = taken.local_addr().expect("addr").port();
    let (status, err) = on_new.post(ENDPOINTS, &json!({"port": held, "ips": ["127.0.0.1"]}));
    assert_eq!(status, 400, "a port in use: {err}");
    let (_, list) = on_new.get(ENDPOINTS);
    assert_eq!(ports(&list), [u64::from(new)], "nothing changed");

    // After a restart (still started with --api-addr on the old port) the recorded
    // endpoint is what serves.
    s.api_port = new;
    s.restart();
    assert!(!listening(old), "the old port stays closed after restart");
    let admin = s.admin();
    assert_eq!(admin.get("/api/v2/clusterinfo").0, 200);
    assert_eq!(ports(&admin.get(ENDPOINTS).1), [u64::from(new)]);
    let (ok, out) = s.cli(&["journal", "verify"]);
    assert!(ok, "{out}");
    let (ok, exported) = s.cli(&["journal", "export"]);
    assert!(ok && exported.contains("AdminEndpointDeleted"));
}

#[test]
fn admin_endpoints_are_cluster_admin_only_and_validated() {
    let s = Server::start();
    let admin = s.admin();
    assert_eq!(admin.post("/api/v2/projects", &json!({"name": "p"})).0, 200);
    let p_admin = s.client_with_roles(&["p:admin"]);
    assert_eq!(p_admin.get(ENDPOINTS).0, 403);
    let port = free_port();
    assert_eq!(
        p_admin
            .post(ENDPOINTS, &json!({"port": port, "ips": ["127.0.0.1"]}))
            .0,
        403
    );
    assert_eq!(s.anonymous().get(ENDPOINTS).0, 401);
    assert!(!listening(port), "a refused request binds nothing");
    for bad in [
        json!({"port": 0, "ips": ["127.0.0.1"]}),
        json!({"port": 70000, "ips": ["127.0.0.1"]}),
        json!({"port": port, "ips": []}),
        json!({"port": port, "ips": ["localhost"]}),
    ] {
        assert_eq!(admin.post(ENDPOINTS, &bad).0, 400, "{bad}");
    }
    assert_eq!(admin.get(&format!("{ENDPOINTS}/{port}")).0, 404);
    assert_eq!(admin.get(&format!("{ENDPOINTS}/{}", s.api_port)).0, 200);
}

/// Whether something accepts TCP connections on `ip:port`.
fn listening_on(ip: &str, port: u16) -> bool {
    TcpStream::connect((ip, port)).is_ok()
}

#[test]
fn changing_the_addresses_of_a_port_binds_the_new_ones_then_releases_the_old() {
    let s = Server::start();
    let port = s.api_port;
    let admin = s.admin();
    let path = format!("{ENDPOINTS}/{port}");
    assert!(!listening_on("127.0.0.2", port));
    let (status, updated) = admin.put(
        &path,
        &json!({"port": port, "ips": ["127.0.0.1", "127.0.0.2"]}),
    );
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["ips"], json!(["127.0.0.1", "127.0.0.2"]));
    assert!(listening_on("127.0.0.2", port), "bound before the answer");
    assert_eq!(admin.get("/api/v2/clusterinfo").0, 200);
    // If-Match is honoured.
    let (status, _) = admin.put_if_match(&path, &json!({"port": port, "ips": ["127.0.0.1"]}), "1");
    assert_eq!(status, 412, "a stale ETag");
    let etag = updated["ETag"].as_str().expect("ETag").to_string();
    let (status, updated) =
        admin.put_if_match(&path, &json!({"port": port, "ips": ["127.0.0.1"]}), &etag);
    assert_eq!(status, 200, "{updated}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while listening_on("127.0.0.2", port) {
        assert!(
            Instant::now() < deadline,
            "127.0.0.2:{port} still accepts connections"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(admin.get("/api/v2/clusterinfo").0, 200);
}
