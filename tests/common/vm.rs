//! Runs a guest script in the host VM (shared/tools/nvme-host-vm) against a running
//! `evstor serve`, answering the guest's requests (`REQ-<name>` files in the 9p share) with a
//! callback, and returns the guest's output. `EVSTOR_SKIP_HOST_VM=1` skips (printed).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::Server;

/// What a finished guest run left behind.
pub struct GuestRun {
    pub status: ExitStatus,
    pub output: String,
    pub share: tempfile::TempDir,
    pub secs: f64,
}

impl GuestRun {
    /// Checks the guest reported every `CHECK-OK` name in `expected` and exited 0; a
    /// failure prints the logs of `servers`.
    pub fn assert_checks(&self, expected: &[&str], servers: &[&Server]) {
        let missing: Vec<_> = expected
            .iter()
            .filter(|c| {
                !self
                    .output
                    .lines()
                    .any(|l| l.starts_with(&format!("CHECK-OK {c}")))
            })
            .collect();
        let logs: Vec<String> = servers
            .iter()
            .enumerate()
            .map(|(i, s)| format!("----- server {i} log -----\n{}", s.log()))
            .collect();
        assert!(
            self.status.success(),
            "guest failed ({}); missing {missing:?}; server logs:\n{}",
            self.status,
            logs.join("\n")
        );
        assert!(missing.is_empty(), "checks not reported: {missing:?}");
    }

    /// A file the guest wrote into the share.
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.share.path().join(name)).unwrap_or_default()
    }
}

/// Whether the VM tests are to be skipped (says so on stderr). Under `EVSTOR_REQUIRE_ALL`
/// (CI) a skip is a failure: `cargo test` hides the line and would report the test `ok`.
pub fn skipped(test: &str) -> bool {
    if std::env::var_os("EVSTOR_SKIP_HOST_VM").is_some() {
        assert!(
            std::env::var_os("EVSTOR_REQUIRE_ALL").is_none(),
            "{test}: EVSTOR_SKIP_HOST_VM is set but EVSTOR_REQUIRE_ALL forbids skipping"
        );
        eprintln!("{test}: SKIPPED because EVSTOR_SKIP_HOST_VM is set");
        return true;
    }
    false
}

fn vm_dir() -> PathBuf {
    let shared = std::env::var_os("EVSTOR_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    shared.join("tools/nvme-host-vm")
}

/// Boots the guest with `script` (a path under `tests/host_vm/`) and `env`, calling
/// `on_request(server, name, share)` for each request until the guest exits; the callback
/// may write `VAL-<name>` into the share as its reply. `DONE-<name>` is written after it.
pub fn run_guest(
    s: &mut Server,
    script: &str,
    hostnqn: &str,
    env: &[(&str, String)],
    timeout_s: u64,
    on_request: impl FnMut(&mut Server, &str, &Path),
) -> GuestRun {
    let mut env = env.to_vec();
    env.push(("TARGET_PORT", s.nvme_port.to_string()));
    env.push(("DISC_PORT", s.discovery_port.to_string()));
    run_guest_with(s, script, hostnqn, &env, timeout_s, on_request)
}

/// As [`run_guest`], with any context for the callback (several servers) and the ports
/// the guest needs passed in `env`.
pub fn run_guest_with<C>(
    ctx: &mut C,
    script: &str,
    hostnqn: &str,
    env: &[(&str, String)],
    timeout_s: u64,
    mut on_request: impl FnMut(&mut C, &str, &Path),
) -> GuestRun {
    let vm = vm_dir();
    assert!(
        vm.join("run-guest.sh").exists(),
        "nvme-host-vm not found at {}",
        vm.display()
    );
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/host_vm");
    let share = tempfile::tempdir().expect("share dir");
    std::fs::copy(here.join("lib.sh"), share.path().join("lib.sh")).expect("copy lib.sh");
    let log_path = share.path().join("guest.log");
    let log = std::fs::File::create(&log_path).expect("guest log");
    let began = Instant::now();
    let mut cmd = Command::new(vm.join("run-guest.sh"));
    cmd.arg(here.join(script))
        .args(["--timeout", &timeout_s.to_string()])
        .args(["--share", &share.path().display().to_string()])
        .args(["--hostnqn", hostnqn]);
    for (k, v) in env {
        cmd.args(["--env", &format!("{k}={v}")]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("spawn run-guest.sh");
    let status = loop {
        let requests: Vec<String> = std::fs::read_dir(share.path())
            .expect("read share")
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("REQ-"))
                    .map(str::to_string)
            })
            .collect();
        for name in requests {
            // Each request is served once (names are unique within a script): one that
            // shows up again after its answer (the guest retried a create that 9p reported
            // failed but that did happen) is only removed.
            let done = share.path().join(format!("DONE-{name}"));
            if !done.exists() {
                on_request(ctx, &name, share.path());
                std::fs::write(&done, b"").expect("DONE file");
            }
            let _ = std::fs::remove_file(share.path().join(format!("REQ-{name}")));
        }
        if let Some(st) = child.try_wait().expect("wait for guest") {
            break st;
        }
        if began.elapsed() > Duration::from_secs(timeout_s + 60) {
            let _ = child.kill();
            break child.wait().expect("reap guest");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let secs = began.elapsed().as_secs_f64();
    eprintln!("{output}");
    eprintln!("{script}: guest finished in {secs:.1}s with {status}");
    GuestRun {
        status,
        output,
        share,
        secs,
    }
}
