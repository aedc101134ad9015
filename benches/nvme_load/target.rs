//! The targets nvme_load measures: `evstor serve` (release binary, REST-created volume), an
//! in-process target per volume kind, and a child process serving many connections (the
//! `--scale` mode); plus CPU pinning and accounting, and a process's resident memory.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use evstor_datapath::blockstore::{BlockStore, DeviceSpec};
use evstor_datapath::{Acl, Backing, NamespaceSpec, QosLimits, TargetConfig, TargetHandle};
use serde_json::{json, Value};
use uuid::Uuid;

/// Subsystem NQN of the in-process target.
pub const IN_PROCESS_NQN: &str = "nqn.2024-01.io.evstor:nvme-load";
/// Size of the volume under test, for every kind.
pub const VOLUME_BYTES: u64 = 1 << 30;
/// Pool device of the in-process block store (a sparse tmpfs file): room for the prefill
/// and the overwrites whose space is reclaimed only after a metadata sync.
const STORE_DEVICE_BYTES: u64 = 4 << 30;
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Name prefix of the initiator's queue threads (CPU accounting tells them from the target's).
pub const QUEUE_THREAD_PREFIX: &str = "nvme-load-q";
/// Connections the `--scale` child target admits (idle and active queues, their admin
/// queues, the prefill session), from one host NQN and one address.
const SCALE_CONNECTIONS_MAX: usize = 4096;

/// What backs the volume under test, and who serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    File,
    Store,
    StoreLz4,
    StoreSnap,
    Plain,
    Compressed,
    Snapshotted,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::File,
        Kind::Store,
        Kind::StoreLz4,
        Kind::StoreSnap,
        Kind::Plain,
        Kind::Compressed,
        Kind::Snapshotted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Store => "store",
            Kind::StoreLz4 => "store-lz4",
            Kind::StoreSnap => "store-snap",
            Kind::Plain => "plain",
            Kind::Compressed => "compressed",
            Kind::Snapshotted => "snapshotted",
        }
    }

    /// Served by `evstor serve` rather than by a target in this process.
    pub fn served(self) -> bool {
        matches!(self, Kind::Plain | Kind::Compressed | Kind::Snapshotted)
    }

    fn compress(self) -> bool {
        matches!(self, Kind::StoreLz4 | Kind::Compressed)
    }

    pub fn snapshot(self) -> bool {
        matches!(self, Kind::StoreSnap | Kind::Snapshotted)
    }
}

pub struct Server {
    child: Child,
    dir: tempfile::TempDir,
    api: String,
    nvme: SocketAddr,
    agent: ureq::Agent,
    token: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A fresh directory on tmpfs (where there is one) for a target's data.
pub fn bench_dir() -> anyhow::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let mut b = tempfile::Builder::new();
    b.prefix("evstor-bench-");
    Ok(if shm.is_dir() {
        b.tempdir_in(shm)?
    } else {
        b.tempdir()?
    })
}

impl Server {
    fn start(bin: &Path) -> anyhow::Result<Server> {
        let dir = bench_dir()?;
        let (api_port, nvme_port, disc_port) = (free_port()?, free_port()?, free_port()?);
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--api-addr")
            .arg(format!("127.0.0.1:{api_port}"))
            .arg("--nvme-addr")
            .arg(format!("127.0.0.1:{nvme_port}"))
            .arg("--discovery-addr")
            .arg(format!("127.0.0.1:{disc_port}"))
            .env("EVSTOR_LOG", "warn")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {} (build it with --release)", bin.display()))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .disable_verification(true)
                    .build(),
            )
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let mut s = Server {
            child,
            dir,
            api: format!("https://127.0.0.1:{api_port}"),
            nvme: SocketAddr::from(([127, 0, 0, 1], nvme_port)),
            agent,
            token: String::new(),
        };
        s.wait_ready()?;
        Ok(s)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let jwt = self.dir.path().join("admin.jwt");
        loop {
            if let Ok(t) = std::fs::read_to_string(&jwt) {
                self.token = t.trim().to_string();
                if matches!(self.get("/api/v2/version"), Ok((200, _))) {
                    return Ok(());
                }
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("evstor exited with {st}: {}", self.log());
            }
            ensure!(
                Instant::now() < deadline,
                "evstor did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn finish(
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut r = r?;
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string()?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let req = self
            .agent
            .get(format!("{}{path}", self.api))
            .header("Authorization", format!("Bearer {}", self.token));
        Self::finish(req.call())
    }

    fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let req = self
            .agent
            .post(format!("{}{path}", self.api))
            .header("Authorization", format!("Bearer {}", self.token))
            .content_type("application/json");
        Self::finish(req.send(body.to_string()))
    }

    /// Creates the bench volume and waits until it is served; returns its UUID and the
    /// subsystem NQN.
    fn create_volume(&self, compress: bool) -> anyhow::Result<(String, String)> {
        let body = json!({
            "name": "bench",
            "size": "1 GiB",
            "acl": {"values": ["ALLOW_ANY"]},
            "replicaCount": 1,
            "compression": if compress { "true" } else { "false" },
        });
        let (st, v) = self.post("/api/v2/projects/default/volumes", &body)?;
        ensure!(st == 200, "create volume: {st} {v}");
        let uuid = v["UUID"].as_str().context("volume UUID")?.to_string();
        self.wait_available(&format!("/api/v2/projects/default/volumes/{uuid}"))?;
        let (st, ci) = self.get("/api/v2/clusterinfo")?;
        ensure!(st == 200, "clusterinfo: {st} {ci}");
        let nqn = ci["subsystemNQN"].as_str().context("subsystemNQN")?;
        Ok((uuid, nqn.to_string()))
    }

    /// Snapshots the volume over the API and waits until the snapshot is Available.
    fn snapshot(&self, volume: &str) -> anyhow::Result<()> {
        let body = json!({"name": "s1", "sourceVolumeUUID": volume});
        let (st, v) = self.post("/api/v2/projects/default/snapshots", &body)?;
        ensure!(st == 200, "create snapshot: {st} {v}");
        let uuid = v["UUID"].as_str().context("snapshot UUID")?;
        self.wait_available(&format!("/api/v2/projects/default/snapshots/{uuid}"))
    }

    fn wait_available(&self, path: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (st, v) = self.get(path)?;
            if st == 200 && v["state"] == "Available" {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "{path} not Available: {st} {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The volume's logical / stored bytes, as the API reports it.
    fn compression_ratio(&self, volume: &str) -> anyhow::Result<f64> {
        let (st, v) = self.get(&format!("/api/v2/projects/default/volumes/{volume}"))?;
        ensure!(st == 200, "get volume: {st} {v}");
        v["statistics"]["compressionRatio"]
            .as_f64()
            .context("statistics.compressionRatio")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The in-process target: the data path alone, for the file baseline and the bare block store.

pub struct InProcess {
    // Fields drop in order: the target stops before the store closes and the directory goes.
    target: TargetHandle,
    store: Option<Arc<BlockStore>>,
    volume: Uuid,
    _dir: tempfile::TempDir,
}

impl InProcess {
    /// Starts the target from a thread on `cpu` (when given): the target's listener and
    /// reactor threads, and RocksDB's, inherit that thread's affinity.
    fn start(kind: Kind, cpu: Option<usize>) -> anyhow::Result<InProcess> {
        let dir = bench_dir()?;
        std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                pin(0, cpu)?;
            }
            Self::serve(kind, dir)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("starting the in-process target panicked"))?
    }

    fn serve(kind: Kind, dir: tempfile::TempDir) -> anyhow::Result<InProcess> {
        let root = dir.path();
        let volume = Uuid::new_v4();
        let (backing, store) = if kind == Kind::File {
            (Backing::File(root.join("volume.img")), None)
        } else {
            let dev = DeviceSpec {
                path: root.join("dev0.img"),
                size_bytes: STORE_DEVICE_BYTES,
            };
            let store = BlockStore::open(&root.join("meta"), &[dev])?;
            store.create_volume(volume)?;
            let compress = kind.compress();
            let backing = Backing::Image {
                store: store.clone(),
                compress,
                replication: None,
            };
            (backing, Some(store))
        };
        let ns = NamespaceSpec {
            nsid: 1,
            uuid: *volume.as_bytes(),
            size_bytes: VOLUME_BYTES,
            backing,
            host_acl: Acl::AllowAny,
            ip_acl: Acl::AllowAny,
            qos: QosLimits::default(),
            ana: Default::default(),
        };
        let cfg = TargetConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), IN_PROCESS_NQN);
        Ok(InProcess {
            target: evstor_datapath::start(cfg, vec![ns])?,
            store,
            volume,
            _dir: dir,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// A target under test, whichever serves it.

pub enum Target {
    Serve {
        srv: Server,
        volume: String,
        subnqn: String,
    },
    InProcess(InProcess),
}

impl Target {
    pub fn start(kind: Kind, bin: &Path, pinned: bool) -> anyhow::Result<Target> {
        let cpu = pinned.then_some(0);
        if !kind.served() {
            return Ok(Target::InProcess(InProcess::start(kind, cpu)?));
        }
        let srv = Server::start(bin)?;
        let (volume, subnqn) = srv.create_volume(kind.compress())?;
        if let Some(cpu) = cpu {
            pin(srv.pid(), cpu)?;
        }
        Ok(Target::Serve {
            srv,
            volume,
            subnqn,
        })
    }

    pub fn nvme(&self) -> SocketAddr {
        match self {
            Target::Serve { srv, .. } => srv.nvme,
            Target::InProcess(t) => t.target.local_addr(),
        }
    }

    pub fn subnqn(&self) -> &str {
        match self {
            Target::Serve { subnqn, .. } => subnqn,
            Target::InProcess(_) => IN_PROCESS_NQN,
        }
    }

    /// Pins the server's threads to CPU 0 again: its reactor threads inherit
    /// CPU 0, but be sure. An in-process target's threads all inherit it.
    pub fn repin(&self) -> anyhow::Result<()> {
        match self {
            Target::Serve { srv, .. } => pin(srv.pid(), 0),
            Target::InProcess(_) => Ok(()),
        }
    }

    pub fn snapshot(&self) -> anyhow::Result<()> {
        match self {
            Target::Serve { srv, volume, .. } => srv.snapshot(volume),
            Target::InProcess(t) => {
                let store = t.store.as_ref().context("a file volume has no snapshots")?;
                Ok(store.snapshot(t.volume, Uuid::new_v4())?)
            }
        }
    }

    /// The volume's logical / stored bytes (None for a file volume).
    pub fn compression_ratio(&self) -> anyhow::Result<Option<f64>> {
        match self {
            Target::Serve { srv, volume, .. } => Ok(Some(srv.compression_ratio(volume)?)),
            Target::InProcess(t) => {
                let Some(store) = &t.store else {
                    return Ok(None);
                };
                let u = store.usage(t.volume)?;
                let r = evstor_datapath::blockstore::ratio(u.owned_logical_bytes, u.owned_bytes);
                Ok(Some(r))
            }
        }
    }

    /// CPU seconds used so far by (the target, the initiator).
    pub fn cpu_secs(&self) -> anyhow::Result<(f64, f64)> {
        let host = initiator_cpu_secs()?;
        let target = match self {
            Target::Serve { srv, .. } => stat_cpu_secs(&format!("/proc/{}/stat", srv.pid()))?,
            // Exited threads stay in the process total; the initiator's threads outlive the
            // measured window, so the difference is the target's (and nothing else runs).
            Target::InProcess(_) => stat_cpu_secs("/proc/self/stat")? - host,
        };
        Ok((target, host))
    }
}

// ---------------------------------------------------------------------------------------------
// CPU placement and accounting.

/// The calling thread's CPU set.
pub fn affinity() -> anyhow::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most size_of_val(&set) bytes into the local set.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    ensure!(
        r == 0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    Ok(set)
}

/// Pins every thread of `pid` (0: the calling thread) to `cpu`; later threads inherit it.
pub fn pin(pid: u32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of the local set; cpu < CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set_affinity(pid, &set)
}

/// Sets the CPU set of every thread of `pid` (0: the calling thread).
pub fn set_affinity(pid: u32, set: &libc::cpu_set_t) -> anyhow::Result<()> {
    let tids: Vec<i32> = if pid == 0 {
        vec![0]
    } else {
        std::fs::read_dir(format!("/proc/{pid}/task"))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    };
    for tid in tids {
        // SAFETY: passes a valid cpu_set_t of the size given; the kernel only reads it.
        let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(set), set) };
        let e = std::io::Error::last_os_error();
        // ESRCH: the thread exited after the directory was read; there is nothing to pin.
        ensure!(
            r == 0 || e.raw_os_error() == Some(libc::ESRCH),
            "sched_setaffinity({tid}): {e}"
        );
    }
    Ok(())
}

/// utime + stime from a `/proc/.../stat` file (a process's or one thread's), in seconds.
pub fn stat_cpu_secs(path: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(path)?;
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// CPU seconds of the initiator: this process's main thread and its queue threads.
pub fn initiator_cpu_secs() -> anyhow::Result<f64> {
    let main_tid = std::process::id();
    let mut secs = 0.0;
    for e in std::fs::read_dir("/proc/self/task")? {
        let Some(tid) = e?.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        // A thread that exits between the listing and these reads counts for nothing.
        let dir = format!("/proc/self/task/{tid}");
        let Ok(comm) = std::fs::read_to_string(format!("{dir}/comm")) else {
            continue;
        };
        if tid == main_tid || comm.starts_with(QUEUE_THREAD_PREFIX) {
            secs += stat_cpu_secs(&format!("{dir}/stat")).unwrap_or(0.0);
        }
    }
    Ok(secs)
}

// ---------------------------------------------------------------------------------------------
// The `--scale` target: a file volume served by a child process (this bench binary again),
// so its resident memory is the target's alone, with admission limits raised for one host
// holding thousands of connections.

/// The child process; it exits when its stdin closes (this handle dropped, or the bench died).
pub struct ChildTarget {
    child: Child,
    _stdin: ChildStdin,
    pub nvme: SocketAddr,
}

impl ChildTarget {
    pub fn spawn() -> anyhow::Result<ChildTarget> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("--scale-target-child")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().context("child stdin")?;
        let out = child.stdout.take().context("child stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        let nvme = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("child target said {line:?}"))?;
        Ok(ChildTarget {
            child,
            _stdin: stdin,
            nvme,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's side: serve a 1 GiB file volume until stdin closes.
pub fn serve_child() -> anyhow::Result<()> {
    let dir = bench_dir()?;
    let ns = NamespaceSpec {
        nsid: 1,
        uuid: [0x5c; 16],
        size_bytes: VOLUME_BYTES,
        backing: Backing::File(dir.path().join("volume.img")),
        host_acl: Acl::AllowAny,
        ip_acl: Acl::AllowAny,
        qos: QosLimits::default(),
        ana: Default::default(),
    };
    let mut cfg = TargetConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), IN_PROCESS_NQN);
    cfg.max_connections = SCALE_CONNECTIONS_MAX;
    cfg.max_connections_per_host = SCALE_CONNECTIONS_MAX;
    cfg.max_controllers_per_host = SCALE_CONNECTIONS_MAX;
    cfg.max_connections_per_addr = SCALE_CONNECTIONS_MAX;
    cfg.max_controllers_per_addr = SCALE_CONNECTIONS_MAX;
    let target = evstor_datapath::start(cfg, vec![ns])?;
    println!("listening {}", target.local_addr());
    // Blocks until the parent closes the pipe; anything it writes is ignored.
    let mut sink = [0u8; 64];
    while std::io::stdin().read(&mut sink)? > 0 {}
    drop(target);
    Ok(())
}

/// (VmRSS, VmHWM) of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} in /proc/{pid}/status"))?;
        let kib = line.split_whitespace().nth(1).context("value")?;
        Ok(kib.parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
