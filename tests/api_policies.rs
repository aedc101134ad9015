//! End-to-end: QoS policies (CRUD, visibility, attachment to volumes and project defaults).

mod common;

use common::Server;
use serde_json::{json, Value};

fn iops_policy(name: &str) -> Value {
    json!({"name": name, "description": "gold",
           "qoSRateLimitPolicy": {"policyVisibility": "Global",
                                  "limitIOPS": {"writeIOPSLimit": "512", "readIOPSLimit": 1024}}})
}

#[test]
fn policy_crud_and_validation() {
    let s = Server::start();
    let c = s.admin();
    let (status, p) = c.post("/api/v2/policies", &iops_policy("gold"));
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["name"], "gold");
    assert_eq!(p["QoSRateLimitPolicy"]["policyVisibility"], "Global");
    assert_eq!(
        p["QoSRateLimitPolicy"]["limitIOPS"],
        json!({"writeIOPSLimit": 512, "readIOPSLimit": 1024})
    );
    let uuid = p["UUID"].as_str().unwrap().to_string();

    assert_eq!(c.post("/api/v2/policies", &iops_policy("gold")).0, 409);
    assert_eq!(c.post("/api/v2/policies", &iops_policy("bad name")).0, 400);
    let not_step =
        json!({"name": "x", "qoSRateLimitPolicy": {"limitIOPS": {"readIOPSLimit": 100}}});
    assert_eq!(c.post("/api/v2/policies", &not_step).0, 400);
    let two = json!({"name": "x", "qoSRateLimitPolicy": {"limitIOPS": {}, "limitBw": {}}});
    assert_eq!(c.post("/api/v2/policies", &two).0, 400);
    let none = json!({"name": "x", "qoSRateLimitPolicy": {}});
    assert_eq!(c.post("/api/v2/policies", &none).0, 400);
    let unknown_scope = json!({"name": "x", "qoSRateLimitPolicy": {
        "policyVisibility": "Scoped", "projectsNamesScope": ["nope"], "limitBw": {"readBWLimit": 5}}});
    assert_eq!(c.post("/api/v2/policies", &unknown_scope).0, 404);

    // Get by UUID and by name; list with filters.
    let (status, got) = c.get(&format!("/api/v2/policies/{uuid}"));
    assert_eq!((status, &got["UUID"]), (200, &json!(uuid)));
    let (status, got) = c.get("/api/v2/policies/?name=gold");
    assert_eq!((status, &got["UUID"]), (200, &json!(uuid)));
    assert_eq!(c.get("/api/v2/policies/?name=nope").0, 404);
    let (_, list) = c.get("/api/v2/policies?name=gold");
    assert_eq!(list["policies"].as_array().unwrap().len(), 1);

    // Update: new limits kind and description; answer is {}.
    let upd = json!({"description": "silver",
                     "qoSRateLimitPolicy": {"limitBw": {"writeBWLimit": 100, "readBWLimit": 200}}});
    let (status, body) = c.put(&format!("/api/v2/policies/{uuid}"), &upd);
    assert_eq!((status, body), (200, json!({})));
    let (_, got) = c.get(&format!("/api/v2/policies/{uuid}"));
    assert_eq!(got["description"], "silver");
    assert_eq!(
        got["QoSRateLimitPolicy"]["limitBw"],
        json!({"writeBWLimit": 100, "readBWLimit": 200})
    );
    assert!(got["QoSRateLimitPolicy"].get("limitIOPS").is_none());
    assert_eq!(
        c.put(
            "/api/v2/policies/00000000-0000-0000-0000-000000000000",
            &upd
        )
        .0,
        404
    );

    let (status, body) = c.delete(&format!("/api/v2/policies/{uuid}"));
    assert_eq!((status, body), (200, json!({})));
    assert_eq!(c.get(&format!("/api/v2/policies/{uuid}")).0, 404);
    assert_eq!(c.delete(&format!("/api/v2/policies/{uuid}")).0, 404);
}

#[test]
fn policies_attach_to_volumes_and_defaults_and_in_use_ones_stay() {
    let s = Server::start();
    let c = s.admin();
    let (_, gold) = c.post("/api/v2/policies", &iops_policy("gold"));
    let gold_uuid = gold["UUID"].as_str().unwrap().to_string();
    let (_, bronze) = c.post(
        "/api/v2/policies",
        &json!({"name": "bronze", "qoSRateLimitPolicy": {"limitIOPSPerGB": {"readIOPSPerGBLimit": 10}}}),
    );
    let bronze_uuid = bronze["UUID"].as_str().unwrap().to_string();

    // By name on a volume.
    let body = json!({"name": "v1", "size": "1 GiB", "acl": {"values": ["ALLOW_ANY"]},
                      "replicaCount": 1, "qosPolicyName": "gold"});
    let (status, v) = c.post("/api/v2/projects/default/volumes", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["qosPolicyUUID"], gold_uuid.as_str());
    assert_eq!(v["qosPolicyName"], "gold");
    let vol = v["UUID"].as_str().unwrap().to_string();

    // As the default of a project.
    assert_eq!(
        c.post(
            "/api/v2/projects",
            &json!({"name": "p1", "defaultPolicies": [{"policyType": "qosRateLimit", "policyUUID": bronze_uuid}]})
        )
        .0,
        200
    );
    let body =
        json!({"name": "v2", "size": "1 GiB", "acl": {"values": ["ALLOW_ANY"]}, "replicaCount": 1});
    let (status, v2) = c.post("/api/v2/projects/p1/volumes", &body);
    assert_eq!(status, 200, "{v2}");
    assert_eq!(v2["qosPolicyName"], "bronze");

    // In use: 400 with a message naming the user.
    let (status, err) = c.delete(&format!("/api/v2/policies/{gold_uuid}"));
    assert_eq!(status, 400, "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("volume v1"),
        "{err}"
    );
    let (status, err) = c.delete("/api/v2/policies/?name=bronze");
    assert_eq!(status, 400, "{err}");

    // Switching the volume to bronze frees gold.
    let path = format!("/api/v2/projects/default/volumes/{vol}");
    s.wait_for(&path, |_, v| v["state"] == "Available");
    assert_eq!(c.put(&path, &json!({"qosPolicyName": "bronze"})).0, 200);
    assert_eq!(c.delete(&format!("/api/v2/policies/{gold_uuid}")).0, 200);
}

#[test]
fn visibility_and_authorization() {
    let s = Server::start();
    let c = s.admin();
    for p in ["p1", "p2"] {
        assert_eq!(c.post("/api/v2/projects", &json!({"name": p})).0, 200);
    }
    let scoped = json!({"name": "p2only", "qoSRateLimitPolicy": {
        "policyVisibility": "Scoped", "projectsNamesScope": ["p2"], "limitIOPS": {"readIOPSLimit": 256}}});
    let (status, p) = c.post("/api/v2/policies", &scoped);
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["QoSRateLimitPolicy"]["projectsNamesScope"], json!(["p2"]));
    let scoped_uuid = p["UUID"].as_str().unwrap().to_string();
    assert_eq!(c.post("/api/v2/policies", &iops_policy("global")).0, 200);

    // A p1 member sees the global policy only, without its visibility.
    let viewer = s.client_with_roles(&["p1:viewer"]);
    let (status, list) = viewer.get("/api/v2/policies");
    assert_eq!(status, 200, "{list}");
    let list = list["policies"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["name"], "global");
    assert!(list[0]["QoSRateLimitPolicy"]
        .get("policyVisibility")
        .is_none());
    assert_eq!(
        viewer.get(&format!("/api/v2/policies/{scoped_uuid}")).0,
        404
    );
    let p2 = s.client_with_roles(&["p2:viewer"]);
    assert_eq!(p2.get(&format!("/api/v2/policies/{scoped_uuid}")).0, 200);
    let (_, for_p1) = c.get("/api/v2/policies?projectName=p1");
    assert_eq!(for_p1["policies"].as_array().unwrap().len(), 1);

    // A p1 volume cannot use the p2-scoped policy.
    let body = json!({"name": "v", "size": "1 GiB", "acl": {"values": ["ALLOW_ANY"]},
                      "replicaCount": 1, "qosPolicyUUID": scoped_uuid});
    assert_eq!(c.post("/api/v2/projects/p1/volumes", &body).0, 404);

    // Only the cluster admin changes policies.
    let admin_p1 = s.client_with_roles(&["p1:admin"]);
    assert_eq!(
        admin_p1.post("/api/v2/policies", &iops_policy("mine")).0,
        403
    );
    assert_eq!(viewer.post("/api/v2/policies", &iops_policy("mine")).0, 403);
    assert_eq!(
        viewer
            .put(
                &format!("/api/v2/policies/{scoped_uuid}"),
                &json!({"description": "x"})
            )
            .0,
        403
    );
    assert_eq!(
        viewer.delete(&format!("/api/v2/policies/{scoped_uuid}")).0,
        403
    );
    assert_eq!(s.anonymous().get("/api/v2/policies").0, 401);
}
