//! Real-host proof for the whole product: `evstor serve`, volumes created through the REST
//! API, and a stock Linux host (kernel NVMe/TCP initiator, nvme-cli, fio) in a QEMU guest
//! (shared/tools/nvme-host-vm) that discovers, connects, does verified I/O, sees volumes
//! created after it connected, keeps its data across an evstor restart, and loses a volume
//! whose ACL is revoked. The REST side must show the host while it is connected.
//! The guest side is `tests/host_vm/e2e.sh`. `EVSTOR_SKIP_HOST_VM=1` skips it (printed).

mod common;

use common::{vm, Client, Server};
use serde_json::{json, Value};

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:e7570b00-0000-4000-8000-0000000000e2";
const OTHER_HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:e7570b00-0000-4000-8000-0000000000ff";
const GUEST_TIMEOUT_S: u64 = 600;
const EXPECTED: &[&str] = &[
    "discover-cluster-subsystem",
    "connect-sees-only-its-volumes",
    "fio-4k-randwrite-verify",
    "volume-created-after-connect-appears",
    "data-survives-evstor-restart",
    "acl-change-hides-volume",
    "disconnect",
];

fn create(c: &Client, name: &str, acl: &str) -> String {
    let body = json!({"name": name, "size": "64 MiB", "replicaCount": 1, "acl": {"values": [acl]}});
    let (status, v) = c.post("/api/v2/projects/default/volumes", &body);
    assert_eq!(status, 200, "{v}");
    v["UUID"].as_str().expect("UUID").to_string()
}

fn volume_path(uuid: &str) -> String {
    format!("/api/v2/projects/default/volumes/{uuid}")
}

/// Acts on one guest request; records problems seen on the REST side.
fn serve_request(s: &mut Server, name: &str, v1: &str, problems: &mut Vec<String>) {
    match name {
        "check-connected" => {
            let v = s.wait_for(&volume_path(v1), |_, v| {
                v["connectedHosts"]
                    .as_array()
                    .is_some_and(|h| h.contains(&json!(HOSTNQN)))
            });
            if v["connectedHosts"] != json!([HOSTNQN]) {
                problems.push(format!("volume connectedHosts: {}", v["connectedHosts"]));
            }
            let (status, hosts) = s.admin().get("/api/v2/connectedHosts");
            if status == 200 && !hosts.to_string().contains(HOSTNQN) {
                problems.push(format!("GET /connectedHosts lacks the host: {hosts}"));
            }
            let v3 = create(&s.admin(), "v3", "ALLOW_ANY");
            s.wait_for(&volume_path(&v3), |_, v| v["state"] == "Available");
        }
        "restart" => s.restart(),
        "revoke-acl" => {
            let (status, body) = s.admin().put(
                &volume_path(v1),
                &json!({"acl": {"values": ["ALLOW_NONE"]}}),
            );
            if status != 200 {
                problems.push(format!("revoke acl: {status} {body}"));
            }
        }
        other => problems.push(format!("unknown guest request {other}")),
    }
}

#[test]
fn linux_host_uses_volumes_created_through_the_api() {
    if vm::skipped("host_vm_e2e") {
        return;
    }
    let mut s = Server::start();
    let c = s.admin();
    let (_, info) = c.get("/api/v2/clusterinfo");
    let nqn = info["subsystemNQN"]
        .as_str()
        .expect("subsystemNQN")
        .to_string();
    let v1 = create(&c, "v1", HOSTNQN);
    let v2 = create(&c, "v2", OTHER_HOSTNQN);
    for v in [&v1, &v2] {
        s.wait_for(&volume_path(v), |_, v| v["state"] == "Available");
    }
    let mut problems = Vec::new();
    let run = vm::run_guest(
        &mut s,
        "e2e.sh",
        HOSTNQN,
        &[("NQN", nqn)],
        GUEST_TIMEOUT_S,
        |s, name, _| serve_request(s, name, &v1, &mut problems),
    );
    run.assert_checks(EXPECTED, &[&s]);
    assert!(problems.is_empty(), "REST-side problems: {problems:?}");
    // After the disconnect the volume no longer lists the host.
    let v: Value = s.wait_for(&volume_path(&v1), |_, v| v["connectedHosts"].is_null());
    assert_eq!(v["acl"], json!({"values": ["ALLOW_NONE"]}));
}
