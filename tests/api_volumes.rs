//! End-to-end: volumes through the real binary over HTTPS with a real token.

mod common;

use common::Server;
use serde_json::json;

fn create_body(name: &str) -> serde_json::Value {
    json!({"name": name, "size": "1 GiB", "acl": {"values": ["ALLOW_ANY"]}, "replicaCount": 1})
}

#[test]
fn volume_lifecycle_through_the_api() {
    let s = Server::start();
    let c = s.admin();
    let (status, v) = c.post("/api/v2/projects/default/volumes", &create_body("vol1"));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "Creating");
    assert_eq!(v["size"], "1073741824");
    let uuid = v["UUID"].as_str().unwrap().to_string();
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    let v = s.wait_for(&path, |_, v| v["state"] == "Available");
    assert_eq!(v["nsid"], 1);

    // Lookup by name through the empty-UUID route, and the unscoped twin.
    let (status, by_name) = c.get("/api/v2/projects/default/volumes/?name=vol1");
    assert_eq!((status, &by_name["UUID"]), (200, &v["UUID"]));
    let (status, unscoped) = c.get(&format!("/api/v2/volumes/{uuid}?projectName=default"));
    assert_eq!((status, &unscoped["name"]), (200, &json!("vol1")));

    // Duplicate name, bad name, bad size.
    assert_eq!(
        c.post("/api/v2/projects/default/volumes", &create_body("vol1"))
            .0,
        409
    );
    assert_eq!(
        c.post("/api/v2/projects/default/volumes", &create_body("bad name"))
            .0,
        400
    );
    let mut bad = create_body("v2");
    bad["size"] = json!("ten gigs");
    assert_eq!(c.post("/api/v2/projects/default/volumes", &bad).0, 400);

    // Grow with the right ETag; a stale ETag is 412.
    let etag = v["ETag"].as_str().unwrap().to_string();
    let (status, _) = c.put_if_match(&path, &json!({"size": "2GiB"}), "0");
    assert_eq!(status, 412);
    let (status, body) = c.put_if_match(&path, &json!({"size": "2GiB"}), &etag);
    assert_eq!((status, body), (200, json!({})));
    let (_, v2) = c.get(&path);
    assert_eq!(v2["size"], "2147483648");
    assert_ne!(v2["ETag"], v["ETag"]);

    // Delete: Deleting, then gone.
    assert_eq!(c.delete(&path).0, 200);
    s.wait_for(&path, |status, _| status == 404);
    let (status, err) = c.get(&path);
    assert_eq!(status, 404);
    assert_eq!(err["code"], 5);
}

#[test]
fn quirky_clients_are_understood() {
    let s = Server::start();
    let c = s.admin();
    // client A: replicaCount as a string, nulls, "10 gib"; client B: unknown keys.
    let body = json!({
        "name": "qa", "size": "10 gib", "replicaCount": "1", "acl": {"values": ["ALLOW_NONE"]},
        "sourceSnapshotUUID": null, "compression": "True", "uuid": "ignored", "nodeList": []
    });
    let (status, v) = c.post("/api/v2/projects/default/volumes", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["compression"], "true");
    assert_eq!(v["size"], "10737418240");
    // client C: unscoped create with projectName in the body, bytes as a string.
    let body = json!({"name": "qc", "size": "4096", "replicaCount": 1, "projectName": "default",
                      "acl": {"values": ["nqn.2014-08.org.nvmexpress:uuid:0b1e0b1e-0000-4000-8000-00000000c11c"]}});
    let (status, v) = c.post("/api/v2/volumes", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["projectName"], "default");
    // Unknown routes and wrong methods answer JSON errors too.
    let (status, err) = c.get("/api/v2/nope");
    assert_eq!((status, &err["code"]), (404, &json!(5)));
    let (status, err) = c.put("/api/v2/projects/default/volumes", &json!({}));
    assert_eq!((status, &err["code"]), (405, &json!(12)));
    // Malformed JSON is a JSON 400.
    let (status, err) = c.post_raw("/api/v2/projects/default/volumes", "{");
    assert_eq!(status, 400);
    assert_eq!(err["code"], 3);
    // Volumes are served with 4 KiB sectors only: 512-byte sectors and partial sectors are
    // refused, never silently changed.
    for (name, extra) in [
        ("s512", json!({"sectorSize": "sectorSize_512B"})),
        ("n512", json!({"sectorSize": 512, "size": "1 MiB"})),
        ("partial", json!({"size": "6144"})),
        ("decimal", json!({"size": "1 GB"})),
    ] {
        let mut body = create_body(name);
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, err) = c.post("/api/v2/projects/default/volumes", &body);
        assert_eq!((status, &err["code"]), (400, &json!(3)), "{name}: {err}");
    }
    let (_, list) = c.get("/api/v2/projects/default/volumes");
    assert_eq!(list["volumes"].as_array().map(Vec::len), Some(2), "{list}");
}

#[test]
fn paging_with_offset_uuid_and_limit() {
    let s = Server::start();
    let c = s.admin();
    for i in 0..5 {
        assert_eq!(
            c.post(
                "/api/v2/projects/default/volumes",
                &create_body(&format!("p{i}"))
            )
            .0,
            200
        );
    }
    let (_, all) = c.get("/api/v2/projects/default/volumes");
    assert_eq!(all["volumes"].as_array().unwrap().len(), 5);
    let (_, page1) = c.get("/api/v2/projects/default/volumes?limit=2");
    let page1 = page1["volumes"].as_array().unwrap().clone();
    assert_eq!(page1.len(), 2);
    let last = page1[1]["UUID"].as_str().unwrap();
    let (_, page2) = c.get(&format!(
        "/api/v2/projects/default/volumes?limit=2&offsetUUID={last}"
    ));
    let page2 = page2["volumes"].as_array().unwrap();
    assert_eq!(page2.len(), 2);
    assert_eq!(page2[0]["UUID"], all["volumes"][2]["UUID"]);
    let (_, named) = c.get("/api/v2/projects/default/volumes?name=p3");
    assert_eq!(named["volumes"].as_array().unwrap().len(), 1);
}

#[test]
fn authentication_and_authorization_matrix() {
    let s = Server::start();
    let admin = s.admin();
    assert_eq!(
        admin.post("/api/v2/projects", &json!({"name": "p1"})).0,
        200
    );
    assert_eq!(
        admin.post("/api/v2/projects", &json!({"name": "p2"})).0,
        200
    );
    // No token, garbage token: 401 with a JSON body. `version` needs none.
    assert_eq!(s.anonymous().get("/api/v2/volumes").0, 401);
    assert_eq!(
        admin.with_token("not-a-jwt").get("/api/v2/clusterinfo").0,
        401
    );
    assert_eq!(s.anonymous().get("/api/v2/version").0, 200);

    let p1_admin = s.client_with_roles(&["p1:admin"]);
    let p1_viewer = s.client_with_roles(&["p1:viewer"]);
    assert_eq!(
        p1_admin
            .post("/api/v2/projects/p1/volumes", &create_body("a"))
            .0,
        200
    );
    assert_eq!(
        p1_admin
            .post("/api/v2/projects/p2/volumes", &create_body("a"))
            .0,
        403
    );
    assert_eq!(p1_viewer.get("/api/v2/projects/p1/volumes").0, 200);
    assert_eq!(
        p1_viewer
            .post("/api/v2/projects/p1/volumes", &create_body("b"))
            .0,
        403
    );
    assert_eq!(p1_viewer.get("/api/v2/projects/p2/volumes").0, 403);
    // Only the cluster admin creates projects or lists across projects.
    assert_eq!(
        p1_admin.post("/api/v2/projects", &json!({"name": "p3"})).0,
        403
    );
    assert_eq!(p1_admin.get("/api/v2/volumes").0, 400);
    let (status, list) = admin.get("/api/v2/volumes");
    assert_eq!(status, 200);
    assert_eq!(list["volumes"].as_array().unwrap().len(), 1);
}

/// The cluster's volume limit is the data path's namespace limit: volumes numbered past the
/// old 1024-namespace table are served like the first, and `Available` means a host can
/// reach the volume at that moment.
#[test]
fn every_available_volume_is_served_past_a_thousand() {
    use evstor_datapath::initiator::Session;
    const VOLUMES: usize = 1030;
    const WRITERS: usize = 8;
    let s = Server::start();
    std::thread::scope(|scope| {
        for w in 0..WRITERS {
            let c = s.admin();
            scope.spawn(move || {
                for i in (w..VOLUMES).step_by(WRITERS) {
                    let mut body = create_body(&format!("v{i}"));
                    body["size"] = json!("4 MiB");
                    let (status, v) = c.post("/api/v2/projects/default/volumes", &body);
                    assert_eq!(status, 200, "{v}");
                }
            });
        }
    });
    let (_, info) = s.admin().get("/api/v2/clusterinfo");
    let nqn = info["subsystemNQN"].as_str().expect("subsystem NQN");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], s.nvme_port));
    let host = "nqn.2014-08.org.nvmexpress:uuid:0c0c0c0c-0000-4000-8000-000000000c0c";
    let mut h = Session::connect(addr, nqn, host).expect("NVMe/TCP connect");
    for i in 0..VOLUMES {
        s.wait_for(
            &format!("/api/v2/projects/default/volumes/?name=v{i}"),
            |_, v| v["state"] == "Available",
        );
    }
    let served = h.active_namespaces().expect("active namespace list");
    assert_eq!(served, (1..=VOLUMES as u32).collect::<Vec<_>>());
    let last = VOLUMES as u32;
    h.write(last, 1, &[0x5a; 4096])
        .expect("write the last volume");
    assert_eq!(h.read(last, 1, 1).expect("read it back"), vec![0x5a; 4096]);
    // From here on, each new volume is reachable the moment the API says Available.
    for i in 0..5 {
        let mut body = create_body(&format!("late{i}"));
        body["size"] = json!("4 MiB");
        let (status, v) = s.admin().post("/api/v2/projects/default/volumes", &body);
        assert_eq!(status, 200, "{v}");
        let path = format!(
            "/api/v2/projects/default/volumes/{}",
            v["UUID"].as_str().unwrap()
        );
        let v = s.wait_for(&path, |_, v| v["state"] == "Available");
        let nsid = v["nsid"].as_u64().expect("nsid") as u32;
        let served = h.active_namespaces().expect("active namespace list");
        assert!(
            served.contains(&nsid),
            "volume {nsid} Available but not served"
        );
    }
}
