//! REST read path under load: `GET /api/v2/projects/default/volumes/{UUID}` over HTTPS with
//! keep-alive against the real `evstor serve`, paced at a fixed offered rate (latency is
//! measured from each request's scheduled time, so a stall is not hidden) and then flat out.
//! Prints req/s and p50/p99/p99.9; asserts nothing.
//! `cargo bench --bench api_get [-- --quick] [-- --rate N]`.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CONNECTIONS: usize = 8;

struct Server {
    child: Child,
    _dir: tempfile::TempDir,
    port: u16,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .disable_verification(true)
                .build(),
        )
        .http_status_as_error(false)
        .build()
        .into()
}

fn start() -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_evstor"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--api-addr", &format!("127.0.0.1:{port}")])
        .args(["--nvme-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--discovery-addr", &format!("127.0.0.1:{}", free_port())])
        .env("EVSTOR_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn evstor");
    let a = agent();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = dir.path().join("admin.jwt").exists()
            && a.get(format!("https://127.0.0.1:{port}/api/v2/version"))
                .call()
                .is_ok();
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "evstor did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let token = std::fs::read_to_string(dir.path().join("admin.jwt")).expect("token");
    Server {
        child,
        _dir: dir,
        port,
        token,
    }
}

fn create_volume(s: &Server) -> String {
    let body = r#"{"name":"bench","size":"1 GiB","acl":{"values":["ALLOW_ANY"]},"replicaCount":1}"#;
    let mut resp = agent()
        .post(format!(
            "https://127.0.0.1:{}/api/v2/projects/default/volumes",
            s.port
        ))
        .header("Authorization", format!("Bearer {}", s.token))
        .content_type("application/json")
        .send(body)
        .expect("create volume");
    let v: serde_json::Value =
        serde_json::from_str(&resp.body_mut().read_to_string().expect("body")).expect("json");
    v["UUID"].as_str().expect("UUID").to_string()
}

/// Runs `CONNECTIONS` clients for `secs`; `rate` = total offered req/s, 0 = flat out.
fn load(s: &Server, uuid: &str, rate: u64, secs: u64) -> (f64, Vec<Duration>, u64) {
    let url = format!(
        "https://127.0.0.1:{}/api/v2/projects/default/volumes/{uuid}",
        s.port
    );
    let auth = format!("Bearer {}", s.token);
    let started = Instant::now();
    let end = started + Duration::from_secs(secs);
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let (url, auth) = (url.clone(), auth.clone());
            std::thread::spawn(move || {
                let a = agent();
                let mut lat = Vec::new();
                let mut errors = 0u64;
                let interval =
                    (rate > 0).then(|| Duration::from_secs_f64(CONNECTIONS as f64 / rate as f64));
                let mut next = started
                    + interval
                        .map(|d| d.mul_f64(i as f64 / CONNECTIONS as f64))
                        .unwrap_or_default();
                while Instant::now() < end {
                    let scheduled = match interval {
                        Some(d) => {
                            let now = Instant::now();
                            if next > now {
                                std::thread::sleep(next - now);
                            }
                            let s = next;
                            next += d;
                            s
                        }
                        None => Instant::now(),
                    };
                    match a.get(&url).header("Authorization", &auth).call() {
                        Ok(mut r) if r.status() == 200 => {
                            let _ = r.body_mut().read_to_vec();
                            lat.push(scheduled.elapsed());
                        }
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in threads {
        let (l, e) = t.join().expect("client thread");
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    (all.len() as f64 / elapsed, all, errors)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * p) as usize)
        .copied()
        .unwrap_or_default()
}

fn report(label: &str, (rps, lat, errors): (f64, Vec<Duration>, u64)) {
    println!(
        "{label:<28} {rps:>8.0} req/s  p50 {:>9.3?}  p99 {:>9.3?}  p99.9 {:>9.3?}  errors {errors}",
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 0.999),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs = if args.iter().any(|a| a == "--quick") {
        2
    } else {
        10
    };
    let rate: u64 = args
        .iter()
        .position(|a| a == "--rate")
        .and_then(|i| args.get(i + 1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(10_000);
    let s = start();
    let uuid = create_volume(&s);
    println!("# GET volume over HTTPS keep-alive, {CONNECTIONS} connections, {secs}s per run");
    report("warm-up (flat out)", load(&s, &uuid, 0, 1));
    report(
        &format!("offered {rate} req/s"),
        load(&s, &uuid, rate, secs),
    );
    report("flat out", load(&s, &uuid, 0, secs));
}
