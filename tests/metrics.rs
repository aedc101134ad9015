//! `GET /metrics`: Prometheus' own checker accepts the exposition, it needs a system role,
//! and its figures follow what happens: API answers counted by route template (and the ones
//! admission refuses before routing), journal group commits, volumes by state, commands and
//! space written through NVMe/TCP, connected hosts, and the reconciler catching up.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use common::Server;
use evstor_datapath::initiator::Session;
use serde_json::{json, Value};

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:a5a5a5a5-0000-4000-8000-00000000d0d0";
const P: &str = "/api/v2/projects/default";

/// The exposition as text.
fn scrape(s: &Server) -> String {
    let (status, body) = s.admin().get("/metrics");
    assert_eq!(status, 200, "{body}");
    match body {
        Value::String(text) => text,
        other => panic!("/metrics is not text: {other}"),
    }
}

/// The value of the sample whose line starts with `series` (name and labels, exactly).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

/// `promtool check metrics` (Debian's `prometheus` package) on `text`: syntax and naming.
fn promtool_check(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var_os("EVSTOR_REQUIRE_ALL").is_none(),
            "promtool is not installed (apt-get install prometheus) and EVSTOR_REQUIRE_ALL forbids skipping"
        );
        eprintln!("promtool_check: SKIPPED because promtool is not installed");
        return;
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- exposition ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_pass_promtool_and_follow_api_and_data_path() {
    let s = Server::start();
    let c = s.admin();

    // Who may scrape: a system role; a project viewer sees only its project, so not this.
    assert_eq!(s.anonymous().get("/metrics").0, 401);
    let viewer = s.client_with_roles(&["default:viewer"]);
    assert_eq!(viewer.get("/metrics").0, 403);
    let system_viewer = s.client_with_roles(&["system:viewer"]);
    assert_eq!(system_viewer.get("/metrics").0, 200);

    let (status, v) = c.post(
        &format!("{P}/volumes"),
        &json!({"name": "m1", "size": "16 MiB", "acl": {"values": ["ALLOW_ANY"]}, "replicaCount": 1}),
    );
    assert_eq!(status, 200, "{v}");
    let uuid = v["UUID"].as_str().expect("UUID").to_string();
    let v = s.wait_for(&format!("{P}/volumes/{uuid}"), |_, v| {
        v["state"] == "Available"
    });
    let ns = v["nsid"].as_u64().expect("nsid") as u32;
    let (_, info) = c.get("/api/v2/clusterinfo");
    let nqn = info["subsystemNQN"].as_str().expect("subsystem NQN");
    let mut h = Session::connect(
        SocketAddr::from(([127, 0, 0, 1], s.nvme_port)),
        nqn,
        HOSTNQN,
    )
    .expect("connect");
    let block: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    for lba in 0..8 {
        h.write_fua(ns, lba, &block).expect("write");
    }

    let text = scrape(&s);
    promtool_check(&text);

    // The create was counted under its route template, not its concrete path.
    let created = r#"evstor_api_requests_total{route="/api/v2/projects/{projectName}/volumes",method="POST",status="200"}"#;
    assert_eq!(sample(&text, created), Some(1.0), "{text}");
    // Answers refused before routing are counted too (the anonymous scrape above).
    let refused = r#"evstor_api_requests_total{route="unrouted",method="GET",status="401"}"#;
    assert_eq!(sample(&text, refused), Some(1.0), "{text}");
    // The create and the reconciler's completion are journal group commits.
    let commits = sample(&text, "evstor_journal_append_duration_seconds_count").expect("commits");
    assert!(commits >= 2.0, "{text}");
    let head = sample(&text, "evstor_journal_head_seq").expect("head");
    assert!(head >= 2.0, "{text}");
    assert_eq!(
        sample(&text, r#"evstor_volumes{state="Available"}"#),
        Some(1.0),
        "{text}"
    );
    // Eight distinct 4 KiB blocks written through NVMe/TCP.
    let written = r#"evstor_volume_logical_bytes{project="default",volume="m1"}"#;
    assert_eq!(sample(&text, written), Some(8.0 * 4096.0), "{text}");
    assert!(sample(&text, "evstor_pool_used_bytes").expect("pool used") >= 8.0 * 4096.0);
    assert_eq!(
        sample(&text, "evstor_nvme_controllers"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "evstor_nvme_io_queues"), Some(1.0), "{text}");

    // Nothing is pending: the reconciler catches up with the journal's head.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = scrape(&s);
        if sample(&text, "evstor_reconciler_lag_events") == Some(0.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lag never reached 0:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
