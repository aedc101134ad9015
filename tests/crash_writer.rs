//! Crash-only journal writer: when the writer dies (a panic, or an append whose outcome it
//! cannot know) the whole `evstor serve` process exits with a failure, rather than answering
//! 503 to every write over a frozen state; a restart recovers every acknowledged mutation.
//! The death is injected with the `EVSTOR_FAILPOINT` environment variable.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Server;
use serde_json::json;

/// Concurrent clients creating volumes while the writer dies.
const WRITERS: usize = 6;
/// Appends the restarted server makes before the failpoint fires.
const APPENDS_BEFORE_DEATH: &str = "40";
/// Bounds the wait for the process to end, so a server that limps on fails the test instead
/// of hanging it (the exit itself is immediate).
const EXIT_WAIT: Duration = Duration::from_secs(60);

/// Runs writers against a server armed with `failpoint` until it dies; returns the names of
/// the volumes whose creation was acknowledged.
fn hammer_until_death(s: &mut Server, failpoint: &str) -> Vec<String> {
    s.restart_with_env(&[("EVSTOR_FAILPOINT", failpoint)]);
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (c, acked, stop) = (s.admin(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let name = format!("w{w}-{i}");
                    let body = json!({"name": name, "size": "1 GiB", "replicaCount": 1,
                                      "acl": {"values": ["ALLOW_ANY"]}});
                    match c.try_post("/api/v2/projects/default/volumes", &body) {
                        Ok((200, _)) => acked.lock().unwrap().push(name),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    let status = s.wait_exit(EXIT_WAIT);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let status = status.unwrap_or_else(|| {
        panic!(
            "evstor kept running after its journal writer died: {}",
            s.log()
        )
    });
    assert!(
        !status.success(),
        "evstor exited with {status} after its writer died"
    );
    let acked = acked.lock().unwrap().clone();
    assert!(
        !acked.is_empty(),
        "no write was acknowledged before the failpoint"
    );
    acked
}

/// After the death: the journal verifies as it lies on disk, a restart without the
/// failpoint serves every acknowledged volume, and the journal still verifies.
fn recovers(s: &mut Server, acked: &[String]) {
    let (ok, out) = s.cli(&["journal", "verify"]);
    assert!(ok, "verify after the writer died: {out}");
    s.restart_with_env(&[]);
    let c = s.admin();
    for name in acked {
        let (status, v) = c.get(&format!("/api/v2/projects/default/volumes/?name={name}"));
        assert_eq!(status, 200, "acknowledged volume {name} lost: {v}");
    }
    // The restarted server writes again.
    let body = json!({"name": "after", "size": "1 GiB", "replicaCount": 1,
                      "acl": {"values": ["ALLOW_ANY"]}});
    let (status, v) = c.post("/api/v2/projects/default/volumes", &body);
    assert_eq!(status, 200, "{v}");
    let (ok, out) = s.cli(&["journal", "verify"]);
    assert!(ok, "verify after restart: {out}");
}

#[test]
fn a_writer_panic_ends_the_process_and_a_restart_recovers() {
    let mut s = Server::start();
    let acked = hammer_until_death(
        &mut s,
        &format!("writer-panic-after:{APPENDS_BEFORE_DEATH}"),
    );
    assert!(
        s.log().contains("FATAL: the journal writer panicked"),
        "no clear log line: {}",
        s.log()
    );
    recovers(&mut s, &acked);
}

#[test]
fn an_append_with_unknown_outcome_ends_the_process_and_a_restart_recovers() {
    let mut s = Server::start();
    let acked = hammer_until_death(
        &mut s,
        &format!("writer-append-error-after:{APPENDS_BEFORE_DEATH}"),
    );
    assert!(
        s.log()
            .contains("FATAL: journal append failed with an unknown outcome"),
        "no clear log line: {}",
        s.log()
    );
    recovers(&mut s, &acked);
}
