//! Running out of file descriptors: the accept loop backs off and logs at most once per
//! second while accept fails, serves again once descriptors are free, and stops admitting
//! connections while the process is within its descriptor reserve.
//!
//! A process has one descriptor table, and the test harness runs tests on threads of one
//! process, so the target runs in a child process (this test binary again, running only
//! `child_target`) with a low RLIMIT_NOFILE, driven over stdin and watched on stdout and
//! stderr.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use evstor_datapath::{start, Acl, TargetConfig};

const CHILD_ENV: &str = "EVSTOR_FD_CHILD";
const RESERVE_ENV: &str = "EVSTOR_FD_RESERVE";

/// The child's side: a target under a low descriptor limit, plus commands to use up
/// ("hog"), give back ("free") or count ("spare") the descriptors left.
#[test]
fn child_target() {
    let Ok(nofile) = std::env::var(CHILD_ENV) else {
        return; // only meaningful as the child of the tests below
    };
    let nofile: u64 = nofile.parse().expect("limit");
    let reserve: usize = std::env::var(RESERVE_ENV)
        .expect("reserve")
        .parse()
        .expect("reserve");
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("evstor_datapath=warn"))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let rl = libc::rlimit {
        rlim_cur: nofile,
        rlim_max: nofile.max(4096),
    };
    // SAFETY: setrlimit reads one rlimit struct we own.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) }, 0);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = TargetConfig::new("127.0.0.1:0".parse().expect("addr"), NQN);
    cfg.fd_reserve = reserve;
    cfg.max_connections_per_host = 1000;
    cfg.max_controllers_per_host = 1000;
    cfg.max_connections_per_addr = 1000;
    cfg.max_controllers_per_addr = 1000;
    let t = start(cfg, vec![ns(dir.path(), 1, Acl::AllowAny)]).expect("start");
    println!("READY {}", t.local_addr());
    let mut hogged: Vec<std::fs::File> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        match line.expect("stdin").trim() {
            "hog" => {
                while let Ok(f) = std::fs::File::open("/dev/null") {
                    hogged.push(f);
                }
                println!("HOGGED {}", hogged.len());
            }
            "free" => {
                hogged.clear();
                println!("FREED");
            }
            "spare" => {
                let mut n = Vec::new();
                while let Ok(f) = std::fs::File::open("/dev/null") {
                    n.push(f);
                }
                println!("SPARE {}", n.len());
            }
            _ => break,
        }
    }
    t.shutdown();
}

struct TargetProcess {
    child: Child,
    stdin: ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
}

impl TargetProcess {
    fn spawn(nofile: u64, reserve: usize) -> TargetProcess {
        let exe = std::env::current_exe().expect("test binary");
        let mut child = Command::new(exe)
            .args(["child_target", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, nofile.to_string())
            .env(RESERVE_ENV, reserve.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the child target");
        let stdin = child.stdin.take().expect("stdin");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let err = BufReader::new(child.stderr.take().expect("stderr"));
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                sink.lock().expect("stderr lines").push(l);
            }
        });
        let mut c = TargetProcess {
            child,
            stdin,
            lines,
            stderr,
            addr: "0.0.0.0:0".parse().expect("addr"),
        };
        c.addr = c.expect("READY").parse().expect("target address");
        c
    }

    /// What follows `word` on the next stdout line that has it.
    fn expect(&mut self, word: &str) -> String {
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("child said no {word}: {e}"));
            // The harness may have printed "test child_target ... " on the same line.
            if let Some(at) = l.find(word) {
                return l[at + word.len()..].trim().to_string();
            }
        }
    }

    fn ask(&mut self, cmd: &str, answer: &str) -> String {
        writeln!(self.stdin, "{cmd}").expect("child stdin");
        self.expect(answer)
    }

    fn log_lines(&self, what: &str) -> Vec<String> {
        let lines = self.stderr.lock().expect("stderr lines");
        lines.iter().filter(|l| l.contains(what)).cloned().collect()
    }
}

impl Drop for TargetProcess {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

/// An admin Connect; None if the target closed the connection instead.
fn try_admin(addr: SocketAddr, i: usize) -> Option<Host> {
    let mut h = Host::try_over(TcpStream::connect(addr).ok()?, false)?;
    let host = format!("nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-{i:012}");
    match h.try_connect(&ConnectArgs::admin(&host)) {
        Some((OK, _)) => Some(h),
        _ => None,
    }
}

#[test]
fn accept_failures_back_off_and_serving_resumes_when_descriptors_free() {
    let mut c = TargetProcess::spawn(256, 8);
    let hogged: usize = c.ask("hog", "HOGGED").parse().expect("count");
    assert!(hogged > 0);
    let began = Instant::now();
    // The kernel completes the TCP handshake; the target cannot accept it (EMFILE).
    let waiting = TcpStream::connect(c.addr).expect("tcp");
    sleep(Duration::from_secs(3));
    c.ask("free", "FREED");
    let failing_s = began.elapsed().as_secs() + 1;
    let mut h = Host::over(waiting, false);
    assert_eq!(
        h.try_connect(&ConnectArgs::admin(HOST)).map(|r| r.0),
        Some(OK),
        "the connection that waited in the backlog is served once descriptors are free"
    );
    let failures = c.log_lines("accept failed");
    eprintln!(
        "{} accept-failure lines in {failing_s} s: {failures:#?}",
        failures.len()
    );
    assert!(!failures.is_empty(), "the failures were logged");
    assert!(
        failures.len() as u64 <= failing_s + 1,
        "{} accept-failure lines in {failing_s} s: not rate-limited",
        failures.len()
    );
    assert!(
        failures.iter().skip(1).all(|l| l.contains("suppressed")),
        "later lines count what they suppressed: {failures:?}"
    );
}

#[test]
fn connections_leave_a_descriptor_reserve_and_serving_resumes() {
    const RESERVE: usize = 32;
    let mut c = TargetProcess::spawn(128, RESERVE);
    let mut held = Vec::new();
    let refused = (0..200).any(|i| match try_admin(c.addr, i) {
        Some(h) => {
            held.push(h);
            false
        }
        None => true,
    });
    assert!(refused, "connections were admitted until the reserve");
    assert!(held.len() >= 2, "some connections were served first");
    let spare: usize = c.ask("spare", "SPARE").parse().expect("count");
    eprintln!(
        "{} connections admitted, {spare} descriptors spare",
        held.len()
    );
    assert!(
        spare >= RESERVE / 2,
        "only {spare} descriptors left after admitting {} connections",
        held.len()
    );
    held.truncate(held.len() / 2);
    let served = (0..100).any(|i| {
        let ok = try_admin(c.addr, 1000 + i).is_some();
        if !ok {
            sleep(Duration::from_millis(50)); // the closes are noticed on the target's time
        }
        ok
    });
    assert!(
        served,
        "a connection is served once descriptors are free again"
    );
}
