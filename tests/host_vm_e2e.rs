//! Real-host proof for the whole product: `evstor serve`, volumes created through the REST
//! API, and a stock Linux host (kernel NVMe/TCP initiator, nvme-cli, fio) in a QEMU guest
//! (shared/tools/nvme-host-vm) that discovers, connects, does verified I/O, sees volumes
//! created after it connected, keeps its data across an evstor restart, and loses a volume
//! whose ACL is revoked. The REST side must show the host while it is connected.
//! `EVSTOR_SKIP_HOST_VM=1` skips it (printed, never silent).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Server};
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

fn vm_dir() -> PathBuf {
    let shared = std::env::var_os("EVSTOR_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    shared.join("tools/nvme-host-vm")
}

fn create(c: &Client, name: &str, acl: &str) -> String {
    let body = json!({"name": name, "size": "64 MiB", "replicaCount": 1, "acl": {"values": [acl]}});
    let (status, v) = c.post("/api/v2/projects/default/volumes", &body);
    assert_eq!(status, 200, "{v}");
    v["UUID"].as_str().expect("UUID").to_string()
}

fn volume_path(uuid: &str) -> String {
    format!("/api/v2/projects/default/volumes/{uuid}")
}

/// Acts on one guest request, if any; returns problems seen on the REST side.
fn serve_requests(s: &mut Server, share: &Path, v1: &str, problems: &mut Vec<String>) {
    let pending = |n: &str| share.join(format!("REQ-{n}")).exists();
    let done = |n: &str| {
        std::fs::write(share.join(format!("DONE-{n}")), b"").expect("DONE file");
        let _ = std::fs::remove_file(share.join(format!("REQ-{n}")));
    };
    if pending("check-connected") {
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
        done("check-connected");
    }
    if pending("restart") {
        s.restart();
        done("restart");
    }
    if pending("revoke-acl") {
        let c = s.admin();
        let (status, body) = c.put(
            &volume_path(v1),
            &json!({"acl": {"values": ["ALLOW_NONE"]}}),
        );
        if status != 200 {
            problems.push(format!("revoke acl: {status} {body}"));
        }
        done("revoke-acl");
    }
}

#[test]
fn linux_host_uses_volumes_created_through_the_api() {
    if std::env::var_os("EVSTOR_SKIP_HOST_VM").is_some() {
        eprintln!("host_vm_e2e: SKIPPED because EVSTOR_SKIP_HOST_VM is set");
        return;
    }
    let vm = vm_dir();
    assert!(
        vm.join("run-guest.sh").exists(),
        "nvme-host-vm not found at {}",
        vm.display()
    );
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
    let share = tempfile::tempdir().expect("share dir");
    let log_path = share.path().join("guest.log");
    let log = std::fs::File::create(&log_path).expect("guest log");
    let began = Instant::now();
    let mut child = Command::new(vm.join("run-guest.sh"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/host_vm_e2e/guest.sh"))
        .args(["--timeout", &GUEST_TIMEOUT_S.to_string()])
        .args(["--share", &share.path().display().to_string()])
        .args(["--hostnqn", HOSTNQN])
        .args(["--env", &format!("NQN={nqn}")])
        .args(["--env", &format!("TARGET_PORT={}", s.nvme_port)])
        .args(["--env", &format!("DISC_PORT={}", s.discovery_port)])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("spawn run-guest.sh");
    let mut problems = Vec::new();
    let status = loop {
        serve_requests(&mut s, share.path(), &v1, &mut problems);
        if let Some(st) = child.try_wait().expect("wait for guest") {
            break st;
        }
        if began.elapsed() > Duration::from_secs(GUEST_TIMEOUT_S + 60) {
            let _ = child.kill();
            break child.wait().expect("reap guest");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(&log_path).unwrap_or_default();
    eprintln!("{out}");
    eprintln!(
        "host_vm_e2e: guest finished in {:.1}s with {status}",
        began.elapsed().as_secs_f64()
    );
    let missing: Vec<_> = EXPECTED
        .iter()
        .filter(|c| !out.lines().any(|l| l.starts_with(&format!("CHECK-OK {c}"))))
        .collect();
    assert!(
        status.success(),
        "guest failed ({status}); missing {missing:?}; server log:\n{}",
        s.log()
    );
    assert!(missing.is_empty(), "checks not reported: {missing:?}");
    assert!(problems.is_empty(), "REST-side problems: {problems:?}");
    // After the disconnect the volume no longer lists the host.
    let v: Value = s.wait_for(&volume_path(&v1), |_, v| v["connectedHosts"].is_null());
    assert_eq!(v["acl"], json!({"values": ["ALLOW_NONE"]}));
}
