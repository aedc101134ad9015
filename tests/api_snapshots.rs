//! End-to-end: snapshots, clones, rollback and retention through the real binary, checking
//! the data a host reads over NVMe/TCP (the crate's small initiator) and the space the
//! cluster reports.

mod common;

use std::net::SocketAddr;

use common::Server;
use evstor_datapath::initiator::Session;
use serde_json::{json, Value};

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:a5a5a5a5-0000-4000-8000-00000000a5a5";
const BLOCK: u64 = 4096;

const P: &str = "/api/v2/projects/default";

fn create_volume(s: &Server, name: &str, extra: Value) -> String {
    let mut body = json!({"name": name, "size": "64 MiB", "acl": {"values": ["ALLOW_ANY"]},
                          "replicaCount": 1});
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    let (status, v) = s.admin().post(&format!("{P}/volumes"), &body);
    assert_eq!(status, 200, "{v}");
    let uuid = v["UUID"].as_str().unwrap().to_string();
    s.wait_for(&format!("{P}/volumes/{uuid}"), |_, v| {
        v["state"] == "Available"
    });
    uuid
}

fn create_snapshot(s: &Server, body: Value) -> Value {
    let (status, snap) = s.admin().post(&format!("{P}/snapshots"), &body);
    assert_eq!(status, 200, "{snap}");
    let uuid = snap["UUID"].as_str().unwrap();
    s.wait_for(&format!("{P}/snapshots/{uuid}"), |_, v| {
        v["state"] == "Available"
    })
}

/// An NVMe/TCP session to the server's subsystem.
fn host(s: &Server) -> Session {
    let (_, info) = s.admin().get("/api/v2/clusterinfo");
    let nqn = info["subsystemNQN"].as_str().unwrap().to_string();
    let addr = SocketAddr::from(([127, 0, 0, 1], s.nvme_port));
    Session::connect(addr, &nqn, HOSTNQN).expect("NVMe/TCP connect")
}

fn nsid(s: &Server, uuid: &str) -> u32 {
    let (_, v) = s.admin().get(&format!("{P}/volumes/{uuid}"));
    v["nsid"].as_u64().expect("nsid") as u32
}

/// Writes `bytes` at byte `offset` of a volume (read-modify-write of the blocks it touches).
fn write_at(h: &mut Session, ns: u32, offset: u64, bytes: &[u8]) {
    let first = offset / BLOCK;
    let blocks = (offset + bytes.len() as u64).div_ceil(BLOCK) - first;
    let mut buf = h.read(ns, first, blocks as u32).expect("read");
    let at = (offset - first * BLOCK) as usize;
    buf[at..at + bytes.len()].copy_from_slice(bytes);
    h.write(ns, first, &buf).expect("write");
}

fn read_at(h: &mut Session, ns: u32, offset: u64, len: usize) -> Vec<u8> {
    let first = offset / BLOCK;
    let blocks = (offset + len as u64).div_ceil(BLOCK) - first;
    let buf = h.read(ns, first, blocks as u32).expect("read");
    let at = (offset - first * BLOCK) as usize;
    buf[at..at + len].to_vec()
}

/// Physical bytes the cluster reports in use.
fn used(s: &Server) -> u64 {
    let (_, c) = s.admin().get("/api/v2/cluster");
    c["statistics"]["physicalUsedStorage"]
        .as_str()
        .unwrap_or("0")
        .parse()
        .unwrap()
}

#[test]
fn snapshot_lifecycle_by_uuid_and_name() {
    let s = Server::start();
    let c = s.admin();
    let vol = create_volume(&s, "vol1", json!({"compression": "true"}));
    let (status, snap) = c.post(
        &format!("{P}/snapshots"),
        &json!({"name": "snap1", "sourceVolumeName": "vol1", "description": "first",
                "retentionTime": "24h"}),
    );
    assert_eq!(status, 200, "{snap}");
    assert_eq!(snap["state"], "Creating");
    let uuid = snap["UUID"].as_str().unwrap().to_string();
    let path = format!("{P}/snapshots/{uuid}");
    let snap = s.wait_for(&path, |_, v| v["state"] == "Available");
    assert_eq!(snap["sourceVolumeUUID"], vol.as_str());
    assert_eq!(snap["sourceVolumeName"], "vol1");
    assert_eq!(snap["size"], "67108864");
    assert_eq!(snap["compression"], true, "a JSON bool on snapshots");
    assert_eq!(snap["retentionTime"], "86400s");
    assert_eq!(snap["description"], "first");
    assert_eq!(snap["projectName"], "default");
    // The block store holds it: the full map of an empty volume's snapshot is empty.
    let (status, diff) = c.get(&format!("{P}/snapshots/diff/{uuid}"));
    assert_eq!((status, &diff["lbaRanges"]), (200, &Value::Null), "{diff}");

    // By name: GetSnapshot takes `Name`, ListSnapshots too.
    let (status, by_name) = c.get(&format!("{P}/snapshots/?Name=snap1"));
    assert_eq!((status, &by_name["UUID"]), (200, &json!(uuid)));
    let (_, list) = c.get(&format!("{P}/snapshots?Name=snap1"));
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1);
    assert_eq!(c.get(&format!("{P}/snapshots/?Name=nope")).0, 404);
    assert_eq!(c.get(&format!("{P}/snapshots/")).0, 400);

    // 409 duplicate, 400 bad name and retention, 404 unknown volume.
    let dup = json!({"name": "snap1", "sourceVolumeUUID": vol});
    assert_eq!(c.post(&format!("{P}/snapshots"), &dup).0, 409);
    let bad = json!({"name": "a b", "sourceVolumeUUID": vol});
    assert_eq!(c.post(&format!("{P}/snapshots"), &bad).0, 400);
    let bad = json!({"name": "s2", "sourceVolumeUUID": vol, "retentionTime": "soon"});
    assert_eq!(c.post(&format!("{P}/snapshots"), &bad).0, 400);
    let missing = json!({"name": "s2", "sourceVolumeName": "nope"});
    assert_eq!(c.post(&format!("{P}/snapshots"), &missing).0, 404);

    // Delete by name (lower-case `name`), stale ETag first.
    assert_eq!(
        c.delete_if_match(&format!("{P}/snapshots/?name=snap1"), Some("1"))
            .0,
        412
    );
    let (status, body) = c.delete(&format!("{P}/snapshots/?name=snap1"));
    assert_eq!((status, body), (200, json!({})));
    s.wait_for(&path, |status, _| status == 404);
    assert_eq!(c.get(&format!("{P}/snapshots/diff/{uuid}")).0, 404);
    let (_, list) = c.get(&format!("{P}/snapshots?showAll=true"));
    assert_eq!(list["snapshots"], json!([]));
}

#[test]
fn a_clone_holds_the_snapshot_data_and_rollback_restores_it() {
    let s = Server::start();
    let c = s.admin();
    let empty = used(&s);
    let vol = create_volume(&s, "vol1", json!({}));
    let mut h = host(&s);
    let vn = nsid(&s, &vol);
    write_at(&mut h, vn, 4096, b"before snapshot");
    write_at(&mut h, vn, 40 << 20, b"deep block");
    let snap = create_snapshot(&s, json!({"name": "snap1", "sourceVolumeUUID": vol}));
    let snap_uuid = snap["UUID"].as_str().unwrap().to_string();
    write_at(&mut h, vn, 4096, b"AFTER  SNAPSHOT");
    // Thin and shared: two data blocks plus the one rewritten since the snapshot.
    assert_eq!(used(&s) - empty, 3 * BLOCK);
    let (_, v) = c.get(&format!("{P}/volumes/{vol}"));
    assert_eq!(v["statistics"]["logicalUsedStorage"], "8192", "{v}");
    assert_eq!(v["statistics"]["physicalOwnedCapacity"], "4096", "{v}");
    assert_eq!(v["statistics"]["physicalCapacity"], "12288", "{v}");

    // Clone by snapshot name: same size, the snapshot's bytes, no space of its own yet.
    let clone = create_volume(
        &s,
        "clone1",
        json!({"sourceSnapshotName": "snap1", "size": null}),
    );
    let (_, cv) = c.get(&format!("{P}/volumes/{clone}"));
    assert_eq!(cv["sourceSnapshotUUID"], snap_uuid.as_str());
    assert_eq!(cv["sourceSnapshotName"], "snap1");
    assert_eq!(cv["size"], "67108864");
    assert_eq!(cv["statistics"]["logicalUsedStorage"], "8192", "{cv}");
    assert!(cv["statistics"]["physicalOwnedCapacity"].is_null(), "{cv}");
    let cn = nsid(&s, &clone);
    assert_eq!(read_at(&mut h, cn, 4096, 15), b"before snapshot");
    assert_eq!(read_at(&mut h, cn, 40 << 20, 10), b"deep block");
    assert_eq!(read_at(&mut h, vn, 4096, 15), b"AFTER  SNAPSHOT");
    write_at(&mut h, cn, 40 << 20, b"clone's own");
    assert_eq!(read_at(&mut h, vn, 40 << 20, 10), b"deep block");
    let (_, clones) = c.get(&format!("{P}/volumes?snapshotUUID={snap_uuid}"));
    assert_eq!(clones["volumes"].as_array().unwrap().len(), 1);

    // A snapshot of another volume cannot roll this one back; a missing one is 404.
    let other = create_volume(&s, "other", json!({}));
    let (status, _) = c.put(
        &format!("{P}/volumes/{other}/rollback"),
        &json!({"srcSnapshotUUID": snap_uuid}),
    );
    assert_eq!(status, 400);
    let (status, _) = c.put(
        &format!("{P}/volumes/{vol}/rollback"),
        &json!({"srcSnapshotName": "nope"}),
    );
    assert_eq!(status, 404);

    // Rollback by volume Name (empty UUID segment) and snapshot name.
    let (status, body) = c.put(
        &format!("{P}/volumes//rollback"),
        &json!({"Name": "vol1", "srcSnapshotName": "snap1"}),
    );
    assert_eq!((status, body), (200, json!({})));
    s.wait_for(&format!("{P}/volumes/{vol}"), |_, v| {
        v["state"] == "Available"
    });
    assert_eq!(read_at(&mut h, vn, 4096, 15), b"before snapshot");
    // Rollback by UUIDs, after another overwrite.
    write_at(&mut h, vn, 40 << 20, b"DEEP BLOCK");
    let (status, _) = c.put(
        &format!("{P}/volumes/{vol}/rollback"),
        &json!({"srcSnapshotUUID": snap_uuid}),
    );
    assert_eq!(status, 200);
    s.wait_for(&format!("{P}/volumes/{vol}"), |_, v| {
        v["state"] == "Available"
    });
    assert_eq!(read_at(&mut h, vn, 40 << 20, 10), b"deep block");

    // The volume can go; its snapshot stays usable.
    assert_eq!(c.delete(&format!("{P}/volumes/{vol}")).0, 200);
    s.wait_for(&format!("{P}/volumes/{vol}"), |status, _| status == 404);
    let (status, snap) = c.get(&format!("{P}/snapshots/{snap_uuid}"));
    assert_eq!((status, &snap["state"]), (200, &json!("Available")));
    let clone2 = create_volume(&s, "clone2", json!({"sourceSnapshotUUID": snap_uuid}));
    let c2 = nsid(&s, &clone2);
    assert_eq!(read_at(&mut h, c2, 4096, 15), b"before snapshot");

    // Everything gone: the space is back.
    for v in [&clone, &clone2, &other] {
        assert_eq!(c.delete(&format!("{P}/volumes/{v}")).0, 200);
        s.wait_for(&format!("{P}/volumes/{v}"), |status, _| status == 404);
    }
    assert_eq!(c.delete(&format!("{P}/snapshots/{snap_uuid}")).0, 200);
    s.wait_for(&format!("{P}/snapshots/{snap_uuid}"), |status, _| {
        status == 404
    });
    assert_eq!(
        used(&s),
        empty,
        "freed extents are released (after the next flush)"
    );
}

#[test]
fn retention_expiry_deletes_the_snapshot() {
    let s = Server::start();
    let vol = create_volume(&s, "vol1", json!({}));
    let snap = create_snapshot(
        &s,
        json!({"name": "short", "sourceVolumeUUID": vol, "retentionTime": "2s"}),
    );
    assert_eq!(snap["retentionTime"], "2s");
    let uuid = snap["UUID"].as_str().unwrap();
    s.wait_for(&format!("{P}/snapshots/{uuid}"), |status, _| status == 404);
    assert_eq!(s.admin().get(&format!("{P}/snapshots/diff/{uuid}")).0, 404);
}

#[test]
fn snapshots_survive_a_restart_and_viewers_cannot_mutate() {
    let mut s = Server::start();
    let c = s.admin();
    assert_eq!(c.post("/api/v2/projects", &json!({"name": "p1"})).0, 200);
    let (status, v) = c.post(
        "/api/v2/projects/p1/volumes",
        &json!({"name": "v", "size": "1 MiB", "acl": {"values": ["ALLOW_ANY"]}, "replicaCount": 1}),
    );
    assert_eq!(status, 200, "{v}");
    let vol = v["UUID"].as_str().unwrap().to_string();
    s.wait_for(&format!("/api/v2/projects/p1/volumes/{vol}"), |_, v| {
        v["state"] == "Available"
    });
    let (status, snap) = c.post(
        "/api/v2/projects/p1/snapshots",
        &json!({"name": "s", "sourceVolumeUUID": vol}),
    );
    assert_eq!(status, 200, "{snap}");
    let path = format!(
        "/api/v2/projects/p1/snapshots/{}",
        snap["UUID"].as_str().unwrap()
    );
    s.wait_for(&path, |_, v| v["state"] == "Available");

    let viewer = s.client_with_roles(&["p1:viewer"]);
    assert_eq!(viewer.get(&path).0, 200);
    assert_eq!(viewer.get("/api/v2/projects/p1/snapshots").0, 200);
    let body = json!({"name": "s2", "sourceVolumeUUID": vol});
    assert_eq!(viewer.post("/api/v2/projects/p1/snapshots", &body).0, 403);
    assert_eq!(viewer.delete(&path).0, 403);
    let rb = json!({"srcSnapshotName": "s"});
    assert_eq!(
        viewer
            .put(&format!("/api/v2/projects/p1/volumes/{vol}/rollback"), &rb)
            .0,
        403
    );
    assert_eq!(s.anonymous().get(&path).0, 401);
    assert_eq!(s.client_with_roles(&["default:admin"]).get(&path).0, 403);

    s.restart();
    let (status, again) = s.admin().get(&path);
    assert_eq!((status, &again["state"]), (200, &json!("Available")));
    let (ok, _) = s.cli(&["journal", "verify"]);
    assert!(ok, "journal verify after snapshots");
}
