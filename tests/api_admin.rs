//! End-to-end: the administrative resources (credentials, roles, cluster config, feature
//! flags, events, servers, nodes, NVMe devices, connected hosts) through the real binary.

mod common;

use base64::Engine;
use common::{Client, Server};
use evstor_datapath::initiator::Session;
use serde_json::{json, Value};

fn vol(name: &str) -> Value {
    json!({"name": name, "size": "1 GiB", "acl": {"values": ["ALLOW_ANY"]}, "replicaCount": 1})
}

/// A fresh RSA key pair: (private PKCS#8 PEM, public SPKI PEM).
fn rsa_pair() -> (String, String) {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("rsa key");
    let public = private.to_public_key();
    (
        private
            .to_pkcs8_pem(LineEnding::LF)
            .expect("pem")
            .to_string(),
        public.to_public_key_pem(LineEnding::LF).expect("pem"),
    )
}

/// An RS256 token for credential `kid`, signed with `private_pem`.
fn sign(private_pem: &str, kid: &str, roles: &[&str]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = json!({"sub": "tester", "iss": "tests", "aud": "LightOS", "roles": roles,
                        "iat": now, "nbf": now - 60, "exp": now + 3600});
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.into());
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("key");
    jsonwebtoken::encode(&header, &claims, &key).expect("sign")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn assert_json_error(status: u16, body: &Value, want_status: u16, want_code: u64) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["code"], want_code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[test]
fn a_project_credential_signs_tokens_for_that_project_only_until_deleted() {
    let s = Server::start();
    let admin = s.admin();
    for p in ["p1", "p2"] {
        assert_eq!(admin.post("/api/v2/projects", &json!({"name": p})).0, 200);
    }
    let (private, public) = rsa_pair();
    let path = "/api/v2/projects/p1/credentials";
    let body = json!({"ID": "k1", "type": "RS256PubKey", "payload": b64(public.as_bytes())});
    let (status, created) = admin.post(path, &body);
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["ID"], "k1");
    assert_eq!(created["projectName"], "p1");
    assert_eq!(created["type"], "RS256PubKey");
    assert_eq!(created["payload"], b64(public.as_bytes()));
    let (status, again) = admin.post(path, &body);
    assert_json_error(status, &again, 409, 6);
    let (_, list) = admin.get(path);
    assert_eq!(list["credentials"].as_array().unwrap().len(), 1);
    assert_eq!(admin.get(&format!("{path}/k1")).1, created);
    let (status, err) = admin.get(&format!("{path}/nope"));
    assert_json_error(status, &err, 404, 5);

    // The new key vouches for p1 roles only.
    let p1_admin = Client::new(s.api_port, Some(sign(&private, "p1:k1", &["p1:admin"])));
    assert_eq!(
        p1_admin.post("/api/v2/projects/p1/volumes", &vol("a")).0,
        200
    );
    assert_eq!(p1_admin.get(path).0, 200);
    let claims_p2 = Client::new(s.api_port, Some(sign(&private, "p1:k1", &["p2:admin"])));
    assert_eq!(
        claims_p2.post("/api/v2/projects/p2/volumes", &vol("b")).0,
        403
    );
    let claims_root = Client::new(
        s.api_port,
        Some(sign(
            &private,
            "p1:k1",
            &["system:cluster-admin", "p1:admin"],
        )),
    );
    assert_eq!(claims_root.get("/api/v2/featureFlags").0, 403);
    assert_eq!(
        claims_root
            .post("/api/v2/projects", &json!({"name": "p3"}))
            .0,
        403
    );
    // A token naming the key in another project is unknown.
    let wrong_kid = Client::new(s.api_port, Some(sign(&private, "p2:k1", &["p2:admin"])));
    assert_eq!(wrong_kid.get("/api/v2/projects/p2/volumes").0, 401);

    // Deleting the credential revokes every token it signed.
    assert_eq!(admin.delete(&format!("{path}/k1")), (200, json!({})));
    let (status, err) = p1_admin.get("/api/v2/projects/p1/volumes");
    assert_json_error(status, &err, 401, 16);
    assert_eq!(admin.delete(&format!("{path}/k1")).0, 404);
    let (status, err) = admin.delete("/api/v2/projects/system/credentials/root");
    assert_json_error(status, &err, 400, 9);
    assert!(s.cli(&["journal", "verify"]).0);
}

#[test]
fn credential_payloads_are_validated() {
    let s = Server::start();
    let admin = s.admin();
    let path = "/api/v2/projects/default/credentials";
    let (_, public) = rsa_pair();
    for (body, why) in [
        (
            json!({"ID": "k", "type": "RS256PubKey", "payload": "***"}),
            "not base64",
        ),
        (
            json!({"ID": "k", "type": "RS256PubKey", "payload": b64(b"hello")}),
            "not PEM",
        ),
        (json!({"ID": "k", "type": "RS256PubKey"}), "no payload"),
        (
            json!({"type": "RS256PubKey", "payload": b64(public.as_bytes())}),
            "no ID",
        ),
        (
            json!({"ID": "k", "payload": b64(public.as_bytes())}),
            "no type",
        ),
        (
            json!({"ID": "k", "type": "TlsCertChainPem", "payload": b64(public.as_bytes())}),
            "type",
        ),
        (
            json!({"ID": "bad id", "type": "RS256PubKey", "payload": b64(public.as_bytes())}),
            "id",
        ),
    ] {
        let (status, err) = admin.post(path, &body);
        assert_json_error(status, &err, 400, 3);
        assert!(!err["message"].as_str().unwrap().is_empty(), "{why}");
    }
    let (status, err) = admin.post(
        "/api/v2/projects/nope/credentials",
        &json!({"ID": "k", "type": "RS256PubKey", "payload": b64(public.as_bytes())}),
    );
    assert_json_error(status, &err, 404, 5);
    // Project roles: viewers read, admins write, other projects see nothing.
    let viewer = s.client_with_roles(&["default:viewer"]);
    assert_eq!(viewer.get(path).0, 200);
    let body = json!({"ID": "k", "type": "RS256PubKey", "payload": b64(public.as_bytes())});
    assert_eq!(viewer.post(path, &body).0, 403);
    assert_eq!(s.client_with_roles(&["system:viewer"]).get(path).0, 403);
    assert_eq!(
        s.client_with_roles(&["default:admin"]).post(path, &body).0,
        200
    );
    assert_eq!(s.anonymous().get(path).0, 401);
}

#[test]
fn roles_describe_the_authorization_model() {
    let s = Server::start();
    let admin = s.admin();
    let (status, list) = admin.get("/api/v2/projects/default/roles");
    assert_eq!(status, 200, "{list}");
    let names: Vec<&str> = list["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "viewer"]);
    let (_, system) = admin.get("/api/v2/projects/system/roles");
    assert_eq!(system["roles"][0]["name"], "cluster-admin");
    let (status, one) = admin.get("/api/v2/projects/default/roles/viewer");
    assert_eq!(status, 200);
    let role = &one["role"];
    assert_eq!(
        (&role["name"], &role["projectName"]),
        (&json!("viewer"), &json!("default"))
    );
    let rules: Value = serde_json::from_str(role["rulesJson"].as_str().unwrap()).unwrap();
    assert!(rules.as_array().unwrap().iter().all(|r| r["actions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a == "get" || a == "list")));
    let (status, err) = admin.get("/api/v2/projects/default/roles/cluster-admin");
    assert_json_error(status, &err, 404, 5);
    assert_eq!(admin.get("/api/v2/projects/nope/roles").0, 404);
    let viewer = s.client_with_roles(&["default:viewer"]);
    assert_eq!(viewer.get("/api/v2/projects/default/roles/admin").0, 200);
    assert_eq!(viewer.get("/api/v2/projects/system/roles").0, 403);
}

#[test]
fn cluster_config_lists_validates_updates_and_survives_restart() {
    let mut s = Server::start();
    let admin = s.admin();
    let (status, list) = admin.get("/api/v2/clusterConfig");
    assert_eq!(status, 200, "{list}");
    let values = list["values"].as_array().unwrap();
    assert_eq!(values.len(), 11);
    assert!(values
        .iter()
        .any(|v| v["name"] == "AllowedNumRevives" && v["value"] == "3"));
    let put = |name: &str, value: &str| {
        admin.put(
            &format!("/api/v2/clusterConfig/{name}"),
            &json!({"configParam": {"name": name, "value": value}}),
        )
    };
    assert_eq!(put("EnableTrim", "false"), (200, json!({})));
    assert_eq!(put("RevivesWindowDuration", "2h"), (200, json!({})));
    assert_eq!(put("ClusterName", "prod-7"), (200, json!({})));
    for (name, bad) in [
        ("EnableTrim", "maybe"),
        ("AllowedNumRevives", "-2"),
        ("RevivesWindowDuration", "soon"),
        ("DurationToTurnIntoPermanentFailure", "10m"),
        ("ClusterName", "no spaces"),
        ("DefaultQoSName", "no-such-policy"),
    ] {
        let (status, err) = put(name, bad);
        assert_json_error(status, &err, 400, 3);
    }
    let (status, err) = put("NoSuchParam", "1");
    assert_json_error(status, &err, 404, 5);
    let (status, err) = admin.get("/api/v2/clusterConfig/NoSuchParam");
    assert_json_error(status, &err, 404, 5);
    let (status, err) = admin.put("/api/v2/clusterConfig/EnableTrim", &json!({}));
    assert_json_error(status, &err, 400, 3);
    // The path names the parameter even when the body says otherwise.
    let body = json!({"configParam": {"name": "AllowedNumRevives", "value": "true"}});
    assert_eq!(admin.put("/api/v2/clusterConfig/EnableTrim", &body).0, 200);

    s.restart();
    let admin = s.admin();
    let get = |name: &str| admin.get(&format!("/api/v2/clusterConfig/{name}")).1;
    assert_eq!(
        get("EnableTrim"),
        json!({"name": "EnableTrim", "value": "true"})
    );
    assert_eq!(get("RevivesWindowDuration")["value"], "7200s");
    assert_eq!(get("AllowedNumRevives")["value"], "3");
    assert_eq!(admin.get("/api/v2/cluster").1["clusterName"], "prod-7");
    assert_eq!(
        s.client_with_roles(&["default:admin"])
            .get("/api/v2/clusterConfig")
            .0,
        403
    );
    assert_eq!(
        s.anonymous()
            .put("/api/v2/clusterConfig/EnableTrim", &body)
            .0,
        401
    );
    assert!(s.cli(&["journal", "verify"]).0);
}

#[test]
fn feature_flags_enable_disable_and_refuse_what_cannot_change() {
    let s = Server::start();
    let admin = s.admin();
    let (status, list) = admin.get("/api/v2/featureFlags");
    assert_eq!(status, 200, "{list}");
    let flags = list["featureFlags"].as_object().unwrap();
    assert_eq!(flags.len(), 5);
    assert_eq!(
        flags["event-log"],
        json!({"name": "event-log", "enabled": true})
    );
    assert_eq!(flags["evict-data"], json!({"name": "evict-data"}));
    let flag = "/api/v2/featureFlags/evict-data";
    assert_eq!(
        admin.post(&format!("{flag}/enable"), &json!({})),
        (200, json!({}))
    );
    assert_eq!(admin.get(flag).1["enabled"], true);
    assert_eq!(admin.post(&format!("{flag}/enable"), &json!({})).0, 200);
    assert_eq!(admin.post(&format!("{flag}/disable"), &json!({})).0, 200);
    assert_eq!(admin.get(flag).1, json!({"name": "evict-data"}));
    let (status, err) = admin.post("/api/v2/featureFlags/event-log/disable", &json!({}));
    assert_json_error(status, &err, 501, 12);
    let (status, err) = admin.get("/api/v2/featureFlags/warp-drive");
    assert_json_error(status, &err, 400, 3);
    let (status, err) = admin.post("/api/v2/featureFlags/warp-drive/enable", &json!({}));
    assert_json_error(status, &err, 400, 3);
    let p_admin = s.client_with_roles(&["default:admin"]);
    assert_eq!(p_admin.post(&format!("{flag}/enable"), &json!({})).0, 403);
    assert_eq!(p_admin.get("/api/v2/featureFlags").0, 403);
    assert_eq!(s.anonymous().get(flag).0, 401);
}

/// Walks `path` with `nextToken` until the last page; returns every event.
fn walk(c: &Client, path: &str, limit: usize) -> Vec<Value> {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut all = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..10_000 {
        let url = match &token {
            Some(t) => format!("{path}{sep}limit={limit}&nextToken={t}"),
            None => format!("{path}{sep}limit={limit}"),
        };
        let (status, page) = c.get(&url);
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().cloned().unwrap_or_default();
        assert!(events.len() <= limit);
        all.extend(events);
        match page["nextToken"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => return all,
        }
    }
    panic!("paging did not end");
}

fn ids(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["ID"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn events_come_from_the_journal_with_filters_and_paging() {
    let s = Server::start();
    let admin = s.admin();
    assert_eq!(
        admin.post("/api/v2/projects", &json!({"name": "p1"})).0,
        200
    );
    let (_, v) = admin.post("/api/v2/projects/p1/volumes", &vol("v1"));
    let uuid = v["UUID"].as_str().unwrap().to_string();
    let vpath = format!("/api/v2/projects/p1/volumes/{uuid}");
    s.wait_for(&vpath, |_, v| v["state"] == "Available");
    assert_eq!(admin.delete(&vpath).0, 200);
    s.wait_for(&vpath, |status, _| status == 404);
    admin.post(
        "/api/v2/featureFlags/proactive-rebalance/enable",
        &json!({}),
    );

    // The whole log, once, in order, whatever the page size.
    let (status, all) = admin.get("/api/v2/events");
    assert_eq!(status, 200, "{all}");
    assert!(all.get("nextToken").is_none(), "{all}");
    let all = all["events"].as_array().unwrap().clone();
    let (ok, export) = s.cli(&["journal", "export"]);
    assert!(ok);
    assert_eq!(all.len(), export.lines().count());
    let all_ids = ids(&all);
    assert_eq!(all_ids, (1..=all.len() as u64).collect::<Vec<_>>());
    for limit in [1, 2, 3, 7] {
        assert_eq!(
            ids(&walk(&admin, "/api/v2/events", limit)),
            all_ids,
            "limit {limit}"
        );
    }
    let first = &all[0];
    assert_eq!(first["EventName"], "ClusterInitialized");
    assert_eq!(first["Type"], "Cluster");
    assert_eq!(first["Severity"], "Info");
    assert_eq!(first["ReportingService"], "CM");
    assert!(first["Time"].as_str().unwrap().ends_with('Z'));
    assert!(first["ComponentClusterInfo"]["ID"].is_string());
    let created = all
        .iter()
        .find(|e| e["EventName"] == "VolumeCreationRequested")
        .unwrap();
    assert_eq!(created["Type"], "Volume");
    assert_eq!(created["ReportingService"], "API");
    assert_eq!(
        created["ComponentVolumesInfo"]["ProjectVolumesMap"]["p1"]["VolumeComponentInfoList"][0],
        json!({"ID": uuid, "Name": "v1"})
    );
    let device = all
        .iter()
        .find(|e| e["EventName"] == "DeviceAdded")
        .unwrap();
    assert_eq!(device["Type"], "NVMeSSD");

    // Filters.
    let volume_events = walk(&admin, "/api/v2/events?componentType=Volume", 2);
    assert!(volume_events.len() >= 4);
    assert!(volume_events.iter().all(|e| e["Type"] == "Volume"));
    let medium = admin.get("/api/v2/events?severity=Medium").1["events"].clone();
    let medium = medium.as_array().unwrap();
    assert!(medium.iter().any(|e| e["EventName"] == "VolumeDeleted"));
    assert!(medium.iter().all(|e| e["Severity"] == "Medium"));
    let p1 = walk(&admin, "/api/v2/projects/p1/events", 2);
    assert_eq!(
        ids(&p1),
        ids(&walk(&admin, "/api/v2/events?projectName=p1", 3))
    );
    assert!(p1.len() >= 5, "{p1:?}");
    let cut = all[3]["Time"].as_str().unwrap().to_string();
    let since = walk(&admin, &format!("/api/v2/events?since={cut}"), 4);
    let at_or_after: Vec<Value> = all
        .iter()
        .filter(|e| e["Time"].as_str().unwrap() >= cut.as_str())
        .cloned()
        .collect();
    assert_eq!(ids(&since), ids(&at_or_after));
    let until = walk(&admin, &format!("/api/v2/events?until={cut}"), 4);
    assert!(until
        .iter()
        .all(|e| e["Time"].as_str().unwrap() <= cut.as_str()));
    let everything = walk(&admin, "/api/v2/events?until=2999-01-01T00:00:00Z", 5);
    assert_eq!(ids(&everything), all_ids);
    let future = admin.get("/api/v2/events?since=2999-01-01T00:00:00.000Z").1;
    assert!(future
        .get("events")
        .is_none_or(|e| e.as_array().unwrap().is_empty()));
    let past = admin.get("/api/v2/events?until=2000-01-01T12:00:00.000Z").1;
    assert!(past
        .get("events")
        .is_none_or(|e| e.as_array().unwrap().is_empty()));

    // Errors: the documented 501 for two filter kinds, 400s, 404 for a missing project.
    let (status, err) = admin.get("/api/v2/events?severity=Info&componentType=Volume");
    assert_json_error(status, &err, 501, 12);
    let (status, err) = admin.get("/api/v2/projects/p1/events?severity=Info");
    assert_json_error(status, &err, 501, 12);
    for bad in [
        "since=yesterday",
        "limit=-3",
        "nextToken=abc",
        "severity=Loud",
    ] {
        let (status, err) = admin.get(&format!("/api/v2/events?{bad}"));
        assert_json_error(status, &err, 400, 3);
    }
    let (status, err) = admin.get("/api/v2/projects/nope/events");
    assert_json_error(status, &err, 404, 5);

    // Authorization: project readers see their project's events only.
    let viewer = s.client_with_roles(&["p1:viewer"]);
    assert_eq!(viewer.get("/api/v2/projects/p1/events").0, 200);
    assert_eq!(viewer.get("/api/v2/events?projectName=p1").0, 200);
    assert_eq!(viewer.get("/api/v2/events").0, 403);
    assert_eq!(viewer.get("/api/v2/projects/default/events").0, 403);
    assert_eq!(s.anonymous().get("/api/v2/events").0, 401);
}

#[test]
fn servers_nodes_and_devices_describe_the_one_machine() {
    let s = Server::start();
    let admin = s.admin();
    let (status, servers) = admin.get("/api/v2/servers");
    assert_eq!(status, 200, "{servers}");
    let server = servers["servers"][0].clone();
    let server_uuid = server["UUID"].as_str().unwrap().to_string();
    assert_eq!(server["state"], "Enabled");
    assert_eq!(server["RiskOfServiceLossState"], "NoRiskOfServiceLoss");
    let node_uuid = server["NodesUUIDs"][0].as_str().unwrap().to_string();
    assert_eq!(
        admin.get(&format!("/api/v2/servers/{server_uuid}")).1,
        server
    );
    let name = server["name"].as_str().unwrap();
    let by_name = admin.get(&format!("/api/v2/servers?Name={name}")).1;
    assert_eq!(by_name["servers"].as_array().unwrap().len(), 1);
    let none = admin.get("/api/v2/servers?Name=elsewhere").1;
    assert!(none
        .get("servers")
        .is_none_or(|v| v.as_array().unwrap().is_empty()));
    assert_eq!(admin.get("/api/v2/servers?RiskOfServiceLoss=Huge").0, 400);
    let (status, err) = admin.get("/api/v2/servers/not-a-server");
    assert_json_error(status, &err, 404, 5);

    let (status, nodes) = admin.get("/api/v2/nodes");
    assert_eq!(status, 200, "{nodes}");
    let node = nodes["nodes"][0].clone();
    assert_eq!(node["UUID"], node_uuid);
    assert_eq!(node["nvmeEndpoint"], format!("127.0.0.1:{}", s.nvme_port));
    assert_eq!(node["serverUUID"], server_uuid);
    assert_eq!(node["state"], "Active");
    // The pool is the sparse device file made on first start, sized to the free space.
    let dev_file = s.data_dir().join("devices").join("dev0.img");
    let dev_len = std::fs::metadata(&dev_file).unwrap().len().to_string();
    assert_eq!(
        node["statistics"]["managedPhysicalStorage"],
        dev_len.as_str()
    );
    assert_eq!(node["statistics"]["freePhysicalStorage"], dev_len.as_str());
    assert_eq!(admin.get(&format!("/api/v2/nodes/{node_uuid}")).1, node);
    let q = format!("/api/v2/nodes?UUID={node_uuid}&name=x");
    assert_json_error(admin.get(&q).0, &admin.get(&q).1, 400, 3);
    assert_eq!(
        admin
            .get("/api/v2/nodes/00000000-0000-0000-0000-000000000000")
            .0,
        404
    );

    // Volumes count as logical storage on the node.
    let (_, v) = admin.post("/api/v2/projects/default/volumes", &vol("v"));
    let vpath = format!(
        "/api/v2/projects/default/volumes/{}",
        v["UUID"].as_str().unwrap()
    );
    s.wait_for(&vpath, |_, v| v["state"] == "Available");
    let node = admin.get(&format!("/api/v2/nodes/{node_uuid}")).1;
    assert_eq!(node["statistics"]["logicalStorage"], "1073741824");
    let server = admin.get(&format!("/api/v2/servers/{server_uuid}")).1;
    assert_eq!(
        server["RiskOfServiceLossState"],
        "SourceOfRiskOfServiceLoss"
    );

    let (status, devices) = admin.get("/api/v2/nvmeDevices");
    assert_eq!(status, 200, "{devices}");
    let dev = devices["NvmeDevices"][0].clone();
    assert_eq!(dev["size"], dev_len.as_str());
    assert_eq!(dev["name"], dev_file.to_str().unwrap());
    assert_eq!(
        (&dev["nodeUUID"], &dev["serverUUID"]),
        (&json!(node_uuid), &json!(server_uuid))
    );
    assert_eq!(dev["deviceUsage"], "Data");
    let serial = dev["serial"].as_str().unwrap();
    assert_eq!(admin.get(&format!("/api/v2/nvmeDevices/{serial}")).1, dev);
    assert_eq!(admin.get("/api/v2/nvmeDevices/NOPE").0, 404);
    let journal_only = admin.get("/api/v2/nvmeDevices?deviceUsages=Journal").1;
    assert!(journal_only
        .get("NvmeDevices")
        .is_none_or(|d| d.as_array().unwrap().is_empty()));
    let of_node = admin
        .get(&format!(
            "/api/v2/nvmeDevices?nodeUUID={node_uuid}&deviceUsages=Data"
        ))
        .1;
    assert_eq!(of_node["NvmeDevices"].as_array().unwrap().len(), 1);

    // Adding a device through the API: only a spare one (see the test below).
    let body = json!({"serialNumber": "S", "nodeUUID": node_uuid});
    let (status, err) = admin.post("/api/v2/nvmeDevices", &body);
    assert_json_error(status, &err, 404, 5);
    // Servers join a cluster of `evstor serve --etcd` processes; this one has no etcd.
    let body = json!({"serverUUID": uuid::Uuid::new_v4().to_string(),
                      "serverEndpoints": ["127.0.0.1:9443"]});
    let (status, err) = admin.post("/api/v2/servers", &body);
    assert_json_error(status, &err, 400, 9);
    assert!(err["message"].as_str().unwrap().contains("etcd"), "{err}");
    // Node replace: one server has no other node to move its copies to.
    let replace = format!("/api/v2/nodes/{node_uuid}/replace");
    for (target, want_status, want_code) in [
        (json!("x"), 400, 3),
        (json!(node_uuid), 400, 3),
        (json!(uuid::Uuid::new_v4().to_string()), 404, 5),
    ] {
        let body = json!({"TargetNodeUUID": target, "ReplaceWhileActive": true});
        let (status, err) = admin.post(&replace, &body);
        assert_json_error(status, &err, want_status, want_code);
    }
    // The last server cannot go; disabling it stops placement until it is enabled again.
    let (status, err) = admin.delete(&format!("/api/v2/servers/{server_uuid}"));
    assert_json_error(status, &err, 400, 9);
    // It holds the only copy of volume v: disabling it is refused (the reference's "can
    // lead to risk of service loss" 400) and changes nothing, unless forced; evicting has
    // nowhere to move the data to.
    let spath = format!("/api/v2/servers/{server_uuid}");
    let (status, err) = admin.post(&format!("{spath}/disable"), &json!({}));
    assert_json_error(status, &err, 400, 9);
    assert!(
        err["message"].as_str().unwrap().contains("volume v ("),
        "{err}"
    );
    let (status, err) = admin.post(&format!("{spath}/disable"), &json!({"evictData": true}));
    assert_json_error(status, &err, 400, 9);
    let server = admin.get(&spath).1;
    assert_eq!(server["state"], "Enabled", "{server}");
    assert_eq!(server["LastEviction"], json!(null), "{server}");
    assert_eq!(
        server["RiskOfServiceLossState"],
        "SourceOfRiskOfServiceLoss"
    );
    let disabled = admin.post(
        &format!("/api/v2/servers/{server_uuid}/disable"),
        &json!({"ForceDisable": true}),
    );
    assert_eq!(
        (disabled.0, disabled.1["state"].as_str()),
        (200, Some("Disabled"))
    );
    let vol = json!({"name": "nowhere", "size": "1 GiB", "acl": {"values": ["ALLOW_ANY"]},
                     "replicaCount": 1});
    let (status, err) = admin.post("/api/v2/projects/default/volumes", &vol);
    assert_json_error(status, &err, 400, 3);
    let enabled = admin.post(&format!("/api/v2/servers/{server_uuid}/enable"), &json!({}));
    assert_eq!(
        (enabled.0, enabled.1["state"].as_str()),
        (200, Some("Enabled"))
    );
    assert_eq!(
        admin.post("/api/v2/servers/nope/disable", &json!({})).0,
        404
    );

    // Authorization: project roles read nodes (clients need nvmeEndpoint), nothing else.
    let viewer = s.client_with_roles(&["default:viewer"]);
    assert_eq!(viewer.get("/api/v2/nodes").0, 200);
    assert_eq!(viewer.get("/api/v2/servers").0, 403);
    assert_eq!(viewer.get("/api/v2/nvmeDevices").0, 403);
    assert_eq!(
        viewer
            .post(
                &format!("/api/v2/servers/{server_uuid}/disable"),
                &json!({})
            )
            .0,
        403
    );
    for path in ["/api/v2/servers", "/api/v2/nodes", "/api/v2/nvmeDevices"] {
        assert_eq!(s.anonymous().get(path).0, 401, "{path}");
    }
}

/// `UpdateNvmeDevice` records a device's LED pattern (files have no LED, but the contract
/// holds): the enum is validated, an unknown serial or server is 404, a stale `If-Match`
/// 412; the pattern shows in GET, moves the ETag and survives a restart.
/// A spare device (`--spare-device`) is listed `UnManaged`; `POST /nvmeDevices` adds it to
/// the pool while the server runs: writes that found the pool full then fit, and the pool
/// keeps it after a restart.
#[test]
fn a_spare_device_added_through_the_api_extends_the_pool_while_serving() {
    let files = tempfile::tempdir().unwrap();
    let sized = |name: &str, bytes: u64| {
        let p = files.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (dev, spare) = (sized("dev.img", 32 << 20), sized("spare.img", 64 << 20));
    let mut s = Server::start_with(common::Options::args(&[
        "--device",
        &dev,
        "--spare-device",
        &spare,
    ]));
    let admin = s.admin();
    let node = admin.get("/api/v2/nodes").1["nodes"][0]["UUID"]
        .as_str()
        .unwrap()
        .to_string();
    let listed = |usage: &str| {
        admin
            .get(&format!("/api/v2/nvmeDevices?deviceUsages={usage}"))
            .1["NvmeDevices"]
            .as_array()
            .unwrap()
            .clone()
    };
    let unmanaged = listed("UnManaged");
    assert_eq!(unmanaged.len(), 1, "{unmanaged:?}");
    assert_eq!(unmanaged[0]["name"], spare.as_str());
    assert_eq!(unmanaged[0]["nodeUUID"], node.as_str());
    let serial = unmanaged[0]["serial"].as_str().unwrap().to_string();
    let pooled = listed("Data")[0]["serial"].as_str().unwrap().to_string();
    assert_eq!(
        admin.get(&format!("/api/v2/nvmeDevices/{serial}")).1["deviceUsage"],
        "UnManaged"
    );
    let add = |serial: &str, node: &str| {
        admin.post(
            "/api/v2/nvmeDevices",
            &json!({"serialNumber": serial, "nodeUUID": node}),
        )
    };
    let (status, err) = add("", &node);
    assert_json_error(status, &err, 400, 3);
    let (status, err) = add(&pooled, &node);
    assert_json_error(status, &err, 400, 3);
    let (status, err) = add(&serial, &uuid::Uuid::new_v4().to_string());
    assert_json_error(status, &err, 404, 5);
    // A 64 MiB volume on the 32 MiB pool: writes run out of space part way.
    let (status, v) = admin.post("/api/v2/projects/default/volumes", &{
        let mut b = vol("big");
        b["size"] = json!("64 MiB");
        b
    });
    assert_eq!(status, 200, "{v}");
    let vpath = format!(
        "/api/v2/projects/default/volumes/{}",
        v["UUID"].as_str().unwrap()
    );
    let v = s.wait_for(&vpath, |_, v| v["state"] == "Available");
    let nsid = v["nsid"].as_u64().unwrap() as u32;
    let nqn = admin.get("/api/v2/clusterinfo").1["subsystemNQN"]
        .as_str()
        .unwrap()
        .to_string();
    let host = "nqn.2014-08.org.nvmexpress:uuid:5a5a5a5a-0000-4000-8000-00000000d0d0";
    let mut h = Session::connect(
        std::net::SocketAddr::from(([127, 0, 0, 1], s.nvme_port)),
        &nqn,
        host,
    )
    .expect("NVMe/TCP connect");
    const PIECE: u64 = 16; // blocks of 4 KiB per write
    let data = |lba: u64| -> Vec<u8> {
        (0..PIECE as usize * 4096)
            .map(|i| (lba as usize * 7 + i / 4096) as u8 | 1)
            .collect()
    };
    let total = (64 << 20) / 4096;
    let mut full_at = None;
    for lba in (0..total).step_by(PIECE as usize) {
        if h.write(nsid, lba, &data(lba)).is_err() {
            full_at = Some(lba);
            break;
        }
    }
    let full_at = full_at.expect("a 32 MiB pool cannot hold 64 MiB of data");
    assert!(
        full_at >= (24 << 20) / 4096,
        "full after only {full_at} blocks"
    );
    // The spare joins the pool; the rest of the volume fits now.
    let (status, body) = add(&serial, &node);
    assert_eq!((status, body), (200, json!({})));
    assert!(listed("UnManaged").is_empty());
    assert_eq!(listed("Data").len(), 2);
    for lba in (full_at..total).step_by(PIECE as usize) {
        h.write(nsid, lba, &data(lba))
            .unwrap_or_else(|e| panic!("write at {lba} after the device was added: {e}"));
    }
    let last = total - PIECE;
    drop(h);
    s.restart();
    let mut h = Session::connect(
        std::net::SocketAddr::from(([127, 0, 0, 1], s.nvme_port)),
        &nqn,
        host,
    )
    .expect("NVMe/TCP connect after the restart");
    for lba in [0, full_at, last] {
        assert_eq!(
            h.read(nsid, lba, PIECE as u32).unwrap(),
            data(lba),
            "lba {lba}"
        );
    }
    assert_eq!(
        s.admin().get(&format!("/api/v2/nvmeDevices/{serial}")).1["deviceUsage"],
        "Data"
    );
}

#[test]
fn a_device_led_pattern_is_validated_recorded_and_survives_a_restart() {
    let mut s = Server::start();
    let admin = s.admin();
    let dev = admin.get("/api/v2/nvmeDevices").1["NvmeDevices"][0].clone();
    let serial = dev["serial"].as_str().unwrap().to_string();
    let server = dev["serverUUID"].as_str().unwrap().to_string();
    let etag = dev["ETag"].as_str().unwrap().to_string();
    assert!(dev.get("ledPattern").is_none(), "{dev}");
    let path = format!("/api/v2/nvmeDevices/{serial}");
    let other = uuid::Uuid::new_v4().to_string();
    for (p, body, tag, want_status, want_code) in [
        (&path, json!({"ledPattern": "blink"}), None, 400, 3),
        (&path, json!({}), None, 400, 3),
        (
            &path,
            json!({"ledPattern": "locate", "serialNumber": "X"}),
            None,
            400,
            3,
        ),
        (
            &path,
            json!({"ledPattern": "locate", "serverUUID": other}),
            None,
            404,
            5,
        ),
        (&path, json!({"ledPattern": "locate"}), Some("1"), 412, 9),
        (
            &"/api/v2/nvmeDevices/NOPE".to_string(),
            json!({"ledPattern": "locate"}),
            None,
            404,
            5,
        ),
    ] {
        let headers: Vec<(&str, &[u8])> = tag.iter().map(|t| ("If-Match", t.as_bytes())).collect();
        let (status, err) = admin.send_with_headers("POST", p, Some(&body), &headers);
        assert_json_error(status, &err, want_status, want_code);
    }
    assert_eq!(admin.get(&path).1, dev, "refusals change nothing");
    let body = json!({"serverUUID": server, "serialNumber": serial, "ledPattern": "locate"});
    let (status, set) =
        admin.send_with_headers("POST", &path, Some(&body), &[("If-Match", etag.as_bytes())]);
    assert_eq!(status, 200, "{set}");
    assert_eq!(set["ledPattern"], "locate", "{set}");
    assert_ne!(set["ETag"], dev["ETag"], "{set}");
    assert_eq!(admin.get(&path).1, set);
    let (status, off) = admin.post(&path, &json!({"ledPattern": "locate-off"}));
    assert_eq!(
        (status, &off["ledPattern"]),
        (200, &json!("locate-off")),
        "{off}"
    );
    s.restart();
    assert_eq!(s.admin().get(&path).1["ledPattern"], "locate-off");
    // The stored rows are what replaying the events gives.
    let (ok, out) = s.cli(&["journal", "verify"]);
    assert!(ok, "{out}");
}

#[test]
fn connected_hosts_come_from_live_nvme_sessions() {
    let s = Server::start();
    let admin = s.admin();
    let nqn = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
    let (status, list) = admin.get("/api/v2/connectedHosts");
    assert_eq!(status, 200, "{list}");
    assert!(list
        .get("connectedHosts")
        .is_none_or(|h| h.as_array().unwrap().is_empty()));
    // A colon in the last segment is a host NQN, not a custom verb: a JSON 404, not a 405.
    let (status, err) = admin.get(&format!("/api/v2/connectedHosts/{nqn}"));
    assert_json_error(status, &err, 404, 5);

    let (_, v) = admin.post(
        "/api/v2/projects/default/volumes",
        &json!({"name": "h", "size": "1 GiB", "acl": {"values": [nqn]}, "replicaCount": 1}),
    );
    let uuid = v["UUID"].as_str().unwrap().to_string();
    s.wait_for(
        &format!("/api/v2/volumes/{uuid}?projectName=default"),
        |_, v| v["state"] == "Available",
    );
    let subnqn = admin.get("/api/v2/clusterinfo").1["subsystemNQN"]
        .as_str()
        .unwrap()
        .to_string();
    let nvme = std::net::SocketAddr::from(([127, 0, 0, 1], s.nvme_port));
    let _session = Session::connect(nvme, &subnqn, nqn).expect("NVMe/TCP session");

    let want = json!({"hostNQN": nqn, "iPAddress": "127.0.0.1", "volumeUUIDs": [uuid]});
    let list = s.wait_for("/api/v2/connectedHosts", |_, l| {
        l["connectedHosts"].as_array().is_some_and(|h| h.len() == 1)
    });
    assert_eq!(list["connectedHosts"][0], want);
    assert_eq!(admin.get(&format!("/api/v2/connectedHosts/{nqn}")).1, want);
    let encoded = nqn.replace(':', "%3A");
    assert_eq!(
        admin.get(&format!("/api/v2/connectedHosts/{encoded}")).1,
        want
    );
    let by_volume = admin
        .get(&format!("/api/v2/connectedHosts?volumeUUID={uuid}"))
        .1;
    assert_eq!(by_volume["connectedHosts"][0], want);
    let missing = "00000000-0000-0000-0000-000000000000";
    let (status, err) = admin.get(&format!("/api/v2/connectedHosts?volumeUUID={missing}"));
    assert_json_error(status, &err, 404, 5);
    assert_eq!(admin.get("/api/v2/connectedHosts?volumeUUID=zzz").0, 400);
    let viewer = s.client_with_roles(&["default:viewer"]);
    assert_eq!(viewer.get("/api/v2/connectedHosts").0, 403);
    assert_eq!(
        s.anonymous()
            .get(&format!("/api/v2/connectedHosts/{nqn}"))
            .0,
        401
    );
}

#[test]
fn authentication_and_authorization_matrix_for_admin_routes() {
    let s = Server::start();
    let admin = s.admin();
    let server = admin.get("/api/v2/servers").1["servers"][0]["UUID"]
        .as_str()
        .unwrap()
        .to_string();
    let garbage = admin.with_token("not-a-jwt");
    let p_admin = s.client_with_roles(&["default:admin"]);
    let p_viewer = s.client_with_roles(&["default:viewer"]);
    // (path, may a project admin/viewer of `default` read it?)
    let reads = [
        ("/api/v2/clusterConfig".to_string(), false),
        ("/api/v2/clusterConfig/EnableTrim".to_string(), false),
        ("/api/v2/featureFlags".to_string(), false),
        ("/api/v2/featureFlags/event-log".to_string(), false),
        ("/api/v2/events".to_string(), false),
        ("/api/v2/servers".to_string(), false),
        (format!("/api/v2/servers/{server}"), false),
        ("/api/v2/nvmeDevices".to_string(), false),
        ("/api/v2/connectedHosts".to_string(), false),
        ("/api/v2/nodes".to_string(), true),
        ("/api/v2/projects/default/events".to_string(), true),
        ("/api/v2/projects/default/credentials".to_string(), true),
        ("/api/v2/projects/default/roles".to_string(), true),
        ("/api/v2/projects/default/roles/admin".to_string(), true),
    ];
    for (path, project_may_read) in &reads {
        let (status, err) = s.anonymous().get(path);
        assert_json_error(status, &err, 401, 16);
        assert_eq!(garbage.get(path).0, 401, "{path}");
        assert_eq!(admin.get(path).0, 200, "{path}");
        let want = if *project_may_read { 200 } else { 403 };
        for c in [&p_admin, &p_viewer] {
            let (status, body) = c.get(path);
            assert_eq!(status, want, "{path}: {body}");
        }
    }
    // Writes: cluster-wide ones need cluster-admin; a viewer never writes.
    let writes = [
        (
            "PUT",
            "/api/v2/clusterConfig/EnableTrim",
            json!({"configParam": {"value": "true"}}),
        ),
        ("POST", "/api/v2/featureFlags/evict-data/enable", json!({})),
        ("POST", "/api/v2/servers", json!({})),
    ];
    for (method, path, body) in &writes {
        for c in [&p_admin, &p_viewer] {
            let status = if *method == "PUT" {
                c.put(path, body).0
            } else {
                c.post(path, body).0
            };
            assert_eq!(status, 403, "{method} {path}");
        }
        let status = if *method == "PUT" {
            s.anonymous().put(path, body).0
        } else {
            s.anonymous().post(path, body).0
        };
        assert_eq!(status, 401, "{method} {path}");
    }
    assert_eq!(
        p_viewer
            .delete("/api/v2/projects/default/credentials/whatever")
            .0,
        403
    );
}
