//! End-to-end: snapshot schedules (`resourcePolicies`) through the real binary. The server
//! runs with the test-only `EVSTOR_SCHEDULE_CLOCK_SCALE=3600`, so an hourly schedule fires
//! every second and a retention of 3h keeps a snapshot 3 s. Firing is checked through the
//! API and through the journal (`evstor journal export`), which records every fire.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Options, Server};
use serde_json::{json, Value};

const P: &str = "/api/v2/projects/default";
/// Real nanoseconds of one schedule hour at scale 3600.
const HOUR_NS: u64 = 1_000_000_000;

fn scaled_server() -> Server {
    Server::start_with(Options {
        env: vec![("EVSTOR_SCHEDULE_CLOCK_SCALE".into(), "3600".into())],
        ..Options::default()
    })
}

fn create_volume(s: &Server, name: &str) -> String {
    let body = json!({"name": name, "size": "16 MiB", "acl": {"values": ["ALLOW_ANY"]},
                      "replicaCount": 1});
    let (status, v) = s.admin().post(&format!("{P}/volumes"), &body);
    assert_eq!(status, 200, "{v}");
    let uuid = v["UUID"].as_str().unwrap().to_string();
    s.wait_for(&format!("{P}/volumes/{uuid}"), |_, v| {
        v["state"] == "Available"
    });
    uuid
}

/// Now, whole seconds, as RFC 3339 (the schedule's start).
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    evstor_control::api::json::rfc3339(secs * 1_000_000_000)
}

fn hourly(name: &str, volume: &str, hours: u32, retention: &str) -> Value {
    json!({"name": name, "resourceUUID": volume, "description": "every hour",
           "schedulePolicy": {"snapshotSchedulePolicy": {"hourlySchedule":
               {"startTime": now_rfc3339(), "hoursInCycle": hours}},
             "retentionTime": retention}})
}

/// Every journal event as JSON.
fn journal(s: &Server) -> Vec<Value> {
    let (ok, out) = s.cli(&["journal", "export"]);
    assert!(ok, "journal export failed");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The slots `policy` fired, in journal order, and whether its deletion was recorded (and
/// any fire after it).
fn fires(events: &[Value], policy: &str) -> (Vec<u64>, bool, usize) {
    let mut slots = Vec::new();
    let mut deleted = false;
    let mut after_delete = 0;
    for e in events {
        let ev = &e["event"]["Schedule"];
        if let Some(f) = ev.get("ResourcePolicyFired") {
            if f["uuid"] == policy {
                slots.push(f["slot_unix_ns"].as_u64().unwrap());
                after_delete += usize::from(deleted);
            }
        }
        if ev
            .get("ResourcePolicyDeleted")
            .is_some_and(|d| d["uuid"] == policy)
        {
            deleted = true;
        }
    }
    (slots, deleted, after_delete)
}

/// Snapshots of the project whose name starts with `prefix`: name → (UUID, JSON).
fn snapshots_named(s: &Server, prefix: &str) -> Vec<Value> {
    let (status, v) = s.admin().get(&format!("{P}/snapshots"));
    assert_eq!(status, 200, "{v}");
    v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["name"].as_str().unwrap().starts_with(prefix))
        .cloned()
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn bad_requests_are_400_unknown_things_404_duplicates_409_and_viewers_only_read() {
    let s = scaled_server();
    let admin = s.admin();
    let vol = create_volume(&s, "v1");
    let url = format!("{P}/resourcePolicies");
    let ok = hourly("p1", &vol, 24, "72h");
    let bad = |mutate: &dyn Fn(&mut Value), want: u16, says: &str| {
        let mut b = ok.clone();
        mutate(&mut b);
        let (status, v) = admin.post(&url, &b);
        assert_eq!(status, want, "{b} -> {v}");
        assert!(v["message"].as_str().unwrap().contains(says), "{v}");
    };
    bad(
        &|b| b["schedulePolicy"] = Value::Null,
        400,
        "schedulePolicy is required",
    );
    bad(
        &|b| b["name"] = json!("a b"),
        400,
        "invalid resource policy name",
    );
    bad(
        &|b| b["name"] = json!("x".repeat(240)),
        400,
        "longer than 236",
    );
    bad(
        &|b| b["description"] = json!("d".repeat(257)),
        400,
        "description",
    );
    bad(
        &|b| {
            b.as_object_mut().unwrap().remove("resourceUUID");
        },
        400,
        "resourceUUID or resourceName",
    );
    bad(
        &|b| b["schedulePolicy"]["retentionTime"] = json!(""),
        400,
        "retentionTime is required",
    );
    bad(
        &|b| b["schedulePolicy"]["retentionTime"] = json!("soon"),
        400,
        "retentionTime",
    );
    bad(
        &|b| b["schedulePolicy"]["retentionTime"] = json!("30000h"),
        400,
        "at most 1024",
    );
    bad(
        &|b| {
            b["schedulePolicy"]["snapshotSchedulePolicy"]["hourlySchedule"]["hoursInCycle"] =
                json!(0)
        },
        400,
        "hoursInCycle must be 1-8784",
    );
    bad(
        &|b| {
            b["schedulePolicy"]["snapshotSchedulePolicy"]["hourlySchedule"]["startTime"] =
                json!("yesterday")
        },
        400,
        "RFC 3339",
    );
    bad(
        &|b| {
            b["schedulePolicy"]["snapshotSchedulePolicy"]["dailySchedule"] =
                json!({"startTime": now_rfc3339(), "daysInCycle": 1});
        },
        400,
        "exactly one of",
    );
    bad(
        &|b| b["schedulePolicy"]["snapshotSchedulePolicy"] = json!({"weeklySchedule": {"daysOfWeek": [{"startTime": "2024-01-01T02:00:00Z", "day": "Funday"}]}}),
        400,
        "Sunday",
    );
    bad(
        &|b| {
            b["schedulePolicy"]["snapshotSchedulePolicy"] =
                json!({"weeklySchedule": {"daysOfWeek": []}})
        },
        400,
        "1-28 daysOfWeek",
    );
    bad(
        &|b| {
            b["schedulePolicy"]["snapshotSchedulePolicy"]["hourlySchedule"]
                .as_object_mut()
                .unwrap()
                .remove("startTime");
        },
        400,
        "hourlySchedule.startTime is required",
    );
    bad(
        &|b| {
            b["schedulePolicy"]["snapshotSchedulePolicy"]["hourlySchedule"]["hoursInCycle"] =
                json!("often")
        },
        400,
        "hoursInCycle",
    );
    bad(
        &|b| b["schedulePolicy"]["snapshotSchedulePolicy"] = json!({}),
        400,
        "exactly one of",
    );
    bad(
        &|b| b["resourceUUID"] = json!("00000000-0000-4000-8000-000000000001"),
        404,
        "not found",
    );
    bad(
        &|b| {
            b.as_object_mut().unwrap().remove("resourceUUID");
            b["resourceName"] = json!("nope");
        },
        404,
        "not found",
    );
    let (status, _) = admin.post("/api/v2/projects/nope/resourcePolicies", &ok);
    assert_eq!(status, 404);

    // A weekly schedule with a numeric offset in its time, by volume name.
    let mut weekly = ok.clone();
    weekly.as_object_mut().unwrap().remove("resourceUUID");
    weekly["resourceName"] = json!("v1");
    weekly["name"] = json!("weekly");
    weekly["schedulePolicy"] = json!({"snapshotSchedulePolicy": {"weeklySchedule": {"daysOfWeek": [
        {"startTime": "2024-01-01T04:30:00+02:00", "day": "Monday"},
        {"startTime": "2024-01-01T02:30:00Z", "day": "Friday"}]}}, "retentionTime": "336h"});
    let (status, w) = admin.post(&url, &weekly);
    assert_eq!(status, 200, "{w}");
    assert_eq!(w["resourceUUID"], vol.as_str());
    assert_eq!(w["resourceName"], "v1");
    assert_eq!(w["state"], "Active");
    assert_eq!(w["schedulePolicy"]["retentionTime"], "1209600s");
    let days = &w["schedulePolicy"]["snapshotSchedulePolicy"]["weeklySchedule"]["daysOfWeek"];
    assert_eq!(days[0]["day"], "Monday");
    assert_eq!(days[0]["startTime"], "2024-01-01T02:30:00.000Z");

    let (status, p) = admin.post(&url, &ok);
    assert_eq!(status, 200, "{p}");
    let (status, v) = admin.post(&url, &ok);
    assert_eq!(status, 409, "{v}");
    let uuid = p["UUID"].as_str().unwrap();
    let one = format!("{url}/{uuid}");
    let (status, got) = admin.get(&one);
    assert_eq!((status, &got), (200, &p));
    let (status, _) = admin.get(&format!("{url}/00000000-0000-4000-8000-000000000001"));
    assert_eq!(status, 404);
    let (status, _) = admin.get(&format!("{url}/not-a-uuid"));
    assert_eq!(status, 400);
    let (_, list) = admin.get(&format!("{url}?volumeUUID={vol}"));
    assert_eq!(list["resourcePolicies"].as_array().unwrap().len(), 2);
    let (_, list) = admin.get(&format!("{url}?UUID={uuid}"));
    assert_eq!(list["resourcePolicies"].as_array().unwrap().len(), 1);

    // Viewers read; only admins change.
    let viewer = s.client_with_roles(&["default:viewer"]);
    let (status, _) = viewer.get(&one);
    assert_eq!(status, 200);
    let (status, _) = viewer.delete(&one);
    assert_eq!(status, 403);
    let (status, _) = viewer.post(&url, &ok);
    assert_eq!(status, 403);

    // Update: a new schedule and description; a stale If-Match is 412.
    let mut change = json!({"schedulePolicy": {"snapshotSchedulePolicy": {"dailySchedule":
        {"startTime": "2024-01-01T02:00:00Z", "daysInCycle": 2}}, "retentionTime": "240h"},
        "description": "every other day"});
    let (status, v) = admin.put_if_match(&one, &change, "1");
    assert_eq!(status, 412, "{v}");
    let (status, v) = admin.put(&one, &change);
    assert_eq!(status, 200, "{v}");
    let (_, got) = admin.get(&one);
    assert_eq!(got["description"], "every other day");
    assert_eq!(
        got["schedulePolicy"]["snapshotSchedulePolicy"]["dailySchedule"]["daysInCycle"],
        2
    );
    // The ETag (the seq of the last change, also in the ETag response header) is a working
    // If-Match; a stale one is refused for deletion too.
    let etag = journal(&s)
        .iter()
        .rev()
        .find(|e| e["type"] == "ResourcePolicyUpdated")
        .map(|e| e["seq"].to_string())
        .unwrap();
    let (status, v) = admin.put_if_match(&one, &change, &etag);
    assert_eq!(status, 200, "{v}");
    let (status, v) = admin.delete_if_match(&one, Some(&etag));
    assert_eq!(status, 412, "{v}");
    change["schedulePolicy"]["retentionTime"] = json!("0s");
    let (status, _) = admin.put(&one, &change);
    assert_eq!(status, 400);

    // Deleting the volume deletes its policies; the journal still shows them before that.
    let before_deletion = evstor_control::api::json::rfc3339(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    std::thread::sleep(Duration::from_millis(20));
    // (503 while one of its scheduled snapshots is being taken.)
    wait_until("the volume's deletion", || {
        admin.delete(&format!("{P}/volumes/{vol}")).0 == 200
    });
    let (status, _) = admin.get(&one);
    assert_eq!(status, 404);
    let (_, list) = admin.get(&url);
    assert_eq!(list["resourcePolicies"], json!([]), "{list}");
    let deleted = journal(&s)
        .iter()
        .filter(|e| e["type"] == "ResourcePolicyDeleted")
        .count();
    assert_eq!(
        deleted, 2,
        "one ResourcePolicyDeleted per policy of the volume"
    );
    let (ok, then) = s.cli(&["journal", "replay", "--until-time", &before_deletion]);
    assert!(ok, "{then}");
    let then: Value = serde_json::from_str(&then).unwrap();
    let policies = then["state"]["resource_policies"]["by_uuid"]
        .as_object()
        .unwrap();
    assert_eq!(policies.len(), 2, "{policies:?}");
    assert_eq!(policies[uuid]["description"], "every other day");
}

#[test]
fn schedules_fire_expire_stop_and_catch_up_once_after_a_restart() {
    let mut s = scaled_server();
    let admin = s.admin();
    let vol = create_volume(&s, "v1");
    let url = format!("{P}/resourcePolicies");

    // Hourly (1 s), kept 3 h (3 s): snapshots appear and the older ones expire.
    let (status, p) = admin.post(&url, &hourly("hourly", &vol, 1, "3h"));
    assert_eq!(status, 200, "{p}");
    let hourly_uuid = p["UUID"].as_str().unwrap().to_string();
    let mut first: Option<Value> = None;
    wait_until("5 scheduled snapshots", || {
        let snaps = snapshots_named(&s, "hourly-");
        if first.is_none() {
            first = snaps.first().cloned();
        }
        journal_fires(&s, &hourly_uuid) >= 5
    });
    let first = first.expect("a scheduled snapshot was listed");
    assert_eq!(first["retentionTime"], "3s", "{first}");
    assert_eq!(first["sourceVolumeUUID"], vol.as_str());
    assert_eq!(first["description"], "taken by resource policy hourly");
    let first_uuid = first["UUID"].as_str().unwrap();
    s.wait_for(&format!("{P}/snapshots/{first_uuid}"), |st, _| st == 404);

    // Deleting the policy stops it: no fire is recorded after its deletion.
    let (status, v) = admin.delete(&format!("{url}/{hourly_uuid}"));
    assert_eq!(status, 200, "{v}");
    std::thread::sleep(Duration::from_secs(3));
    let (slots, deleted, after) = fires(&journal(&s), &hourly_uuid);
    assert!(deleted);
    assert_eq!(after, 0, "fires after the deletion");
    assert!(
        slots.windows(2).all(|w| w[1] > w[0]),
        "a slot fired twice: {slots:?}"
    );
    assert!(
        slots.windows(2).all(|w| (w[1] - w[0]) % HOUR_NS == 0),
        "{slots:?}"
    );

    // Every 4 h (4 s): stop the server for more than two slots, start it again.
    let (status, p) = admin.post(&url, &hourly("slow", &vol, 4, "48h"));
    assert_eq!(status, 200, "{p}");
    let slow = p["UUID"].as_str().unwrap().to_string();
    wait_until("a first slow fire", || journal_fires(&s, &slow) >= 1);
    s.stop();
    std::thread::sleep(Duration::from_secs(10));
    s.start_again();
    let (status, again) = s.admin().get(&format!("{url}/{slow}"));
    assert_eq!((status, &again), (200, &p), "state after the restart");
    let before = journal_fires(&s, &slow);
    wait_until("two fires after the restart", || {
        journal_fires(&s, &slow) >= before + 2
    });
    let (slots, _, _) = fires(&journal(&s), &slow);
    let period = 4 * HOUR_NS;
    assert!(
        slots.windows(2).all(|w| w[1] > w[0]),
        "a slot fired twice: {slots:?}"
    );
    assert!(
        slots.windows(2).all(|w| (w[1] - w[0]) % period == 0),
        "{slots:?}"
    );
    // The downtime missed two or more slots; only the latest of them fired (no storm).
    assert!(
        slots.windows(2).any(|w| w[1] - w[0] >= 2 * period),
        "missed slots were all fired after the restart: {slots:?}"
    );
    let names: Vec<String> = snapshots_named(&s, "slow-")
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_string())
        .collect();
    let mut unique = names.clone();
    unique.dedup();
    assert_eq!(unique, names);
    let (ok, verify) = s.cli(&["journal", "verify"]);
    assert!(ok, "{verify}");
}

fn journal_fires(s: &Server, policy: &str) -> usize {
    fires(&journal(s), policy).0.len()
}
