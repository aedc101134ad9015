//! Crash safety: `kill -9` in the middle of concurrent mutations loses no acknowledged
//! mutation, applies none by half, and leaves a journal that verifies.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Server;
use serde_json::json;

/// Concurrent clients hammering the API while the server is killed.
const WRITERS: usize = 8;
/// Longest a new volume may refuse deletion (while `Creating`) before the test fails.
const DELETE_WAIT_MAX: Duration = Duration::from_secs(20);

#[test]
fn kill9_during_concurrent_mutations_loses_nothing_acknowledged() {
    let mut s = Server::start();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let deleted: Arc<Mutex<Vec<String>>> = Arc::default();
    // Deletes sent, acknowledged or not: one in flight at the kill may have landed.
    let deleting: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (c, acked, deleted, deleting, stop, failures) = (
                s.admin(),
                acked.clone(),
                deleted.clone(),
                deleting.clone(),
                stop.clone(),
                failures.clone(),
            );
            std::thread::spawn(move || {
                let fail = |what: String| failures.lock().unwrap().push(what);
                for i in 0.. {
                    let name = format!("w{w}-{i}");
                    let body = json!({"name": name, "size": "1 GiB", "replicaCount": 1,
                                      "acl": {"values": ["ALLOW_ANY"]}});
                    let v = match c.try_post("/api/v2/projects/default/volumes", &body) {
                        Ok((200, v)) => v,
                        // Only a transport error can mean the server is gone: a killed process
                        // answers nothing, so a status (a 5xx above all) is a real failure.
                        Err(_) if stop.load(Ordering::Relaxed) => return,
                        other => return fail(format!("create {name}: {other:?}")),
                    };
                    acked.lock().unwrap().push(name.clone());
                    // Every third volume is deleted again once it is Available.
                    if i % 3 != 0 {
                        continue;
                    }
                    let uuid = v["UUID"].as_str().unwrap().to_string();
                    let path = format!("/api/v2/projects/default/volumes/{uuid}");
                    deleting.lock().unwrap().push(name.clone());
                    let deadline = Instant::now() + DELETE_WAIT_MAX;
                    loop {
                        match c.try_delete(&path) {
                            Ok((200, _)) => break deleted.lock().unwrap().push(name.clone()),
                            Err(_) if stop.load(Ordering::Relaxed) => return,
                            // Still Creating: "unavailable, retry" until it is Available.
                            Ok((503, e))
                                if e["code"] == 14
                                    && e["message"]
                                        .as_str()
                                        .is_some_and(|m| m.contains("Creating"))
                                    && Instant::now() < deadline => {}
                            other => return fail(format!("delete {name}: {other:?}")),
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            })
        })
        .collect();
    // Let the writers get going, then pull the plug without warning.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 60 {
        let failed = failures.lock().unwrap().clone();
        assert!(
            Instant::now() < deadline && failed.is_empty(),
            "writers stalled before the kill: {failed:?}\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    s.kill9();
    for t in threads {
        t.join().expect("writer thread");
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "failures before the kill: {failures:?}"
    );

    // The journal of the killed server verifies as it lies on disk.
    let (ok, out) = s.cli(&["journal", "verify"]);
    assert!(ok, "verify after kill -9: {out}");

    s.restart_after_kill9();
    let c = s.admin();
    let acked = acked.lock().unwrap().clone();
    let deleted = deleted.lock().unwrap().clone();
    let deleting = deleting.lock().unwrap().clone();
    assert!(acked.len() >= 60);
    for name in &acked {
        let (status, v) = c.get(&format!("/api/v2/projects/default/volumes/?name={name}"));
        if deleted.contains(name) {
            // Acknowledged deletes are durable: the volume is deleting or gone.
            assert!(
                status == 404 || v["state"] == "Deleting",
                "{name}: {status} {v}"
            );
        } else if deleting.contains(name) {
            // A delete was in flight at the kill: it may or may not have been committed.
            assert!(status == 200 || status == 404, "{name}: {status} {v}");
        } else {
            assert_eq!(status, 200, "acknowledged volume {name} lost: {v}");
        }
    }
    // Interrupted work resumes: nothing stays Creating or Deleting.
    s.wait_for("/api/v2/projects/default/volumes?showAll=true", |_, v| {
        v["volumes"]
            .as_array()
            .is_some_and(|vs| vs.iter().all(|v| v["state"] == "Available"))
    });
    let (ok, out) = s.cli(&["journal", "verify"]);
    assert!(ok, "verify after restart: {out}");
}
