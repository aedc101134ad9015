//! `evstor serve`: opens (or creates) the data directory, bootstraps a one-server cluster on
//! first start (keys, admin token, TLS certificate, backing devices), then runs the API, the
//! reconciler and the data path until told to stop.
//!
//! Data directory layout: `journal/` (RocksDB), `keys/root.pem` (private, 0600),
//! `admin.jwt`, `tls/{cert,key}.pem`, `devices/dev0.img` (the default sparse pool device) and
//! `blockstore/` (RocksDB: the extent map of every volume and snapshot); in cluster mode also
//! `server-id` (this server's id and name). With `cluster` set ([`ClusterConfig`]), the
//! journal follows the etcd-ordered cluster log and [`crate::cluster::member`] joins or
//! bootstraps the cluster; the rest (target, block store, API, agent) is the same, scoped to
//! this server's node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use evstor_journal::{OpenMode, RocksJournal};
use tokio::sync::watch;
use uuid::Uuid;

use crate::api::{self, App, ServerInfo};
use crate::cluster::member::{self, Member};
use crate::cluster::ClusterConfig;
use crate::dataplane::VolumeStore;
use crate::domain::cluster::{Bootstrap, Command as ClusterCommand};
use crate::domain::inventory::Device;
use crate::domain::Command;
use crate::edge::listeners::ListenerControl;
use crate::edge::{self, EdgeConfig};
use crate::keys::{self, RootKeys};
use crate::reconcile;
use crate::store::{Bus, RequestMeta};

/// Size of the default sparse backing device created on first start.
pub const DEFAULT_DEVICE_BYTES: u64 = 1 << 40;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// Files or block devices for the pool (empty: one sparse file in the data directory).
    /// Devices may be appended between starts, never removed or reordered.
    pub devices: Vec<PathBuf>,
    /// Files or block devices this server has outside its pool, listed as `UnManaged`
    /// until `POST /nvmeDevices` adds one (files are created sparse if missing).
    pub spare_devices: Vec<PathBuf>,
    pub api_addr: SocketAddr,
    pub nvme_addr: SocketAddr,
    pub discovery_addr: SocketAddr,
    /// Deadlines and caps of the API's connections and requests.
    pub api: EdgeConfig,
    /// Cluster mode (`--etcd`); `None` runs the embedded single-server cluster.
    pub cluster: Option<ClusterConfig>,
    /// Lifetime of the `admin.jwt` this server keeps fresh.
    pub admin_token_lifetime_secs: u64,
    /// CA certificates (PEM) trusted for https IdPs besides the system's.
    pub idp_ca_file: Option<PathBuf>,
    /// Reactor threads of the NVMe/TCP data path (0: half the usable CPUs, at least one).
    pub datapath_cores: usize,
}

pub fn journal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("journal")
}

pub fn root_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("root.pem")
}

/// Opens the journal for the CLI's read-only verbs.
pub fn open_journal_read_only(data_dir: &Path) -> anyhow::Result<RocksJournal> {
    RocksJournal::open(&journal_dir(data_dir), OpenMode::ReadOnly)
        .with_context(|| format!("opening the journal in {}", data_dir.display()))
}

pub(crate) fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Generates the root RSA key pair; returns (private PKCS#8 PEM, public SPKI PEM).
pub(crate) fn generate_root_key() -> anyhow::Result<(String, String)> {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048)?;
    let public = private.to_public_key();
    Ok((
        private.to_pkcs8_pem(LineEnding::LF)?.to_string(),
        public.to_public_key_pem(LineEnding::LF)?,
    ))
}

fn ensure_tls(data_dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = data_dir.join("tls").join("cert.pem");
    let key = data_dir.join("tls").join("key.pem");
    if !cert.exists() || !key.exists() {
        let host = hostname();
        let names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
            host,
        ];
        let certified = rcgen::generate_simple_self_signed(names)?;
        write_private(&key, &certified.key_pair.serialize_pem())?;
        write_private(&cert, &certified.cert.pem())?;
        println!(
            "evstor: generated a self-signed TLS certificate at {}",
            cert.display()
        );
    }
    Ok((cert, key))
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Size of the sparse device file made on first start: what the data directory's filesystem
/// has free (a pool cannot store more than that), between 1 GiB and [`DEFAULT_DEVICE_BYTES`].
fn default_device_bytes(dir: &Path) -> u64 {
    let free = nix_free_bytes(dir).unwrap_or(DEFAULT_DEVICE_BYTES);
    (free & !((1 << 30) - 1)).clamp(1 << 30, DEFAULT_DEVICE_BYTES)
}

fn nix_free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data, zeroed is valid; the path is a live NUL-terminated string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; statvfs only writes into `st`.
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0)
        .then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// The device paths this start uses: the configured ones (files are created sparse if
/// missing), or `devices/dev0.img` in the data directory.
pub(crate) fn prepare_devices(cfg: &ServeConfig) -> anyhow::Result<Vec<PathBuf>> {
    let paths = if cfg.devices.is_empty() {
        vec![cfg.data_dir.join("devices").join("dev0.img")]
    } else {
        cfg.devices.clone()
    };
    for p in &paths {
        ensure_device_file(p)?;
    }
    Ok(paths)
}

/// Creates a missing device file, sparse, at the default size.
fn ensure_device_file(p: &Path) -> anyhow::Result<()> {
    if p.exists() {
        return Ok(());
    }
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let size = default_device_bytes(p.parent().unwrap_or(Path::new(".")));
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(p)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("creating the device file {}", p.display()))
}

/// What the cluster records about a device: identity from the drive itself when it is NVMe.
pub(crate) fn device_record(path: &Path) -> anyhow::Result<Device> {
    use evstor_datapath::device::{probe, DeviceKind};
    let info = probe(path).with_context(|| format!("probing the device {}", path.display()))?;
    let serial = info.serial.clone().unwrap_or_else(|| {
        format!(
            "EVS{}",
            &Uuid::new_v4().simple().to_string()[..12].to_uppercase()
        )
    });
    let model = info.model.clone().unwrap_or_else(|| {
        match info.kind {
            DeviceKind::File => "evstor backing file",
            DeviceKind::BlockDevice => "block device",
            DeviceKind::Nvme => "NVMe controller",
        }
        .to_string()
    });
    let mut d = Device::backing_file(&serial, &path.to_string_lossy(), info.size_bytes);
    d.model = model;
    Ok(d)
}

/// First start: the root key, devices, and the bootstrap command (the admin token is the
/// keeper's, [`crate::keys::keep_admin_token`]).
async fn bootstrap(bus: &Bus, cfg: &ServeConfig) -> anyhow::Result<()> {
    if bus.state().cluster.initialized {
        return Ok(());
    }
    let key_path = root_key_path(&cfg.data_dir);
    let (private_pem, public_pem) = generate_root_key()?;
    write_private(&key_path, &private_pem)?;
    let devices = prepare_devices(cfg)?
        .iter()
        .map(|p| device_record(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let b = Bootstrap {
        hostname: hostname(),
        api_endpoint: cfg.api_addr.to_string(),
        nvme_endpoint: cfg.nvme_addr.to_string(),
        devices,
        root_public_key_pem: public_pem,
        server_uuid: None,
        failure_domain: String::new(),
    };
    bus.submit(
        RequestMeta::system("bootstrap"),
        Command::Cluster(ClusterCommand::Bootstrap(b)),
    )
    .await?;
    println!(
        "evstor: initialized a new cluster; root key at {}, admin token (system:cluster-admin) at {}",
        key_path.display(),
        cfg.data_dir.join("admin.jwt").display()
    );
    Ok(())
}

/// Devices named in the configuration that the pool (of `node`, or the only node) does not
/// have yet join it (appended).
pub(crate) async fn add_new_devices(
    bus: &Bus,
    cfg: &ServeConfig,
    node: Option<Uuid>,
) -> anyhow::Result<()> {
    for p in prepare_devices(cfg)? {
        let known = bus
            .state()
            .inventory
            .devices
            .values()
            .any(|d| Path::new(&d.path) == p && node.is_none_or(|n| d.node_uuid == n));
        if !known {
            let mut device = device_record(&p)?;
            if let Some(n) = node {
                device.node_uuid = n;
            }
            bus.submit(
                RequestMeta::system("startup"),
                Command::Inventory(crate::domain::inventory::Command::AddDevice { device }),
            )
            .await?;
        }
    }
    report_spare_devices(bus, cfg, node).await
}

/// Records the configured spare devices of `node` (or the only node) that are not in a
/// pool yet; a spare already known keeps its serial.
async fn report_spare_devices(
    bus: &Bus,
    cfg: &ServeConfig,
    node: Option<Uuid>,
) -> anyhow::Result<()> {
    // What is known of this node's devices; the state's read guard must not be held
    // across the submission.
    let (node, pooled, known) = {
        let state = bus.state();
        let Some(node) = node.or_else(|| state.inventory.first_node().map(|n| n.uuid)) else {
            return Ok(());
        };
        let inv = &state.inventory;
        let pooled: Vec<PathBuf> = inv
            .devices
            .values()
            .filter(|d| d.node_uuid == node)
            .map(|d| PathBuf::from(&d.path))
            .collect();
        let known: Vec<Device> = inv
            .spares
            .values()
            .filter(|d| d.node_uuid == node)
            .cloned()
            .collect();
        (node, pooled, known)
    };
    let mut spares = Vec::new();
    for p in cfg.spare_devices.iter().filter(|p| !pooled.contains(p)) {
        if cfg.devices.contains(p) {
            anyhow::bail!("{} is named both as a device and as a spare", p.display());
        }
        ensure_device_file(p)?;
        spares.push(
            match known.iter().find(|d| Path::new(&d.path) == p.as_path()) {
                Some(d) => d.clone(),
                None => device_record(p)?,
            },
        );
    }
    bus.submit(
        RequestMeta::system("startup"),
        Command::Inventory(crate::domain::inventory::Command::ReportSpareDevices {
            node,
            devices: spares,
        }),
    )
    .await?;
    Ok(())
}

/// The server's TLS configuration from PEM files (HTTP/1.1 only: the edge's deadlines are
/// per HTTP/1.1 connection).
fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Raises the open files limit and returns the API's connection cap.
fn descriptor_budget(cfg: &EdgeConfig) -> usize {
    let open_files = match edge::fds::raise_open_files_limit() {
        Ok(f) if f.soft > f.soft_before => {
            println!(
                "evstor: open files limit raised from {} to {} (hard limit {})",
                f.soft_before, f.soft, f.hard
            );
            f.soft
        }
        Ok(f) => {
            println!(
                "evstor: open files limit {} (hard limit {})",
                f.soft, f.hard
            );
            f.soft
        }
        Err(e) => {
            tracing::warn!("cannot raise the open files limit: {e}");
            1024
        }
    };
    let total = cfg
        .connections_max
        .unwrap_or_else(|| edge::fds::api_connections_max(open_files));
    println!(
        "evstor: API connections at most {total} ({} per client address)",
        cfg.connections_per_addr_max
    );
    total
}

/// Runs evstor until `shutdown` turns true (or SIGINT/SIGTERM when `None`).
pub async fn serve(
    cfg: ServeConfig,
    shutdown: Option<watch::Receiver<bool>>,
) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api_connections_max = descriptor_budget(&cfg.api);
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let (cert, key) = ensure_tls(&cfg.data_dir)?;
    if cfg.cluster.is_some() {
        ports_free(&cfg)?;
    }
    let (bus, member) = start_control(&cfg, &cert).await?;
    let node = member.as_ref().map(|m| m.node_uuid);
    let mut target_cfg = evstor_datapath::TargetConfig::new(
        cfg.nvme_addr,
        bus.state().cluster.subsystem_nqn.clone(),
    );
    target_cfg.discovery_addr = Some(cfg.discovery_addr);
    target_cfg.reactors = cfg.datapath_cores;
    if let Some(m) = &member {
        // Controller IDs unique across the cluster's servers: a range per server slot.
        match bus.state().inventory.servers.get(&m.server_uuid) {
            Some(s) => target_cfg.cntlids = crate::dataplane::cntlid_range(s.slot),
            None => tracing::warn!("this server has no slot yet: controller IDs may collide"),
        }
    }
    let target = evstor_datapath::start(target_cfg, Vec::new())
        .with_context(|| format!("starting the NVMe/TCP target on {}", cfg.nvme_addr))?;
    // Given its cores, the data path has them to itself: the API, the control plane,
    // RocksDB's flushes and compactions run on the others (and so can the block store's
    // syncs, off the reactors).
    let dedicated =
        cfg.datapath_cores > 0 && !target.keep_other_threads_off_reactor_cpus().is_empty();
    let (nvme_addr, discovery_addr) = (target.local_addr(), target.discovery_addr());
    let mut store = VolumeStore::with_target(&cfg.data_dir, &bus.state(), target, node)
        .context("opening the block store")?;
    store.store().set_syncs_off_reactor(dedicated);
    if member.is_some() {
        let listen = crate::dataplane::replication_addr(&nvme_addr.to_string())
            .context("no replication port next to the NVMe/TCP port")?;
        let at = store
            .start_replication(listen)
            .with_context(|| format!("starting the replication listener on {listen}"))?;
        println!("evstor: replication listener on {at}");
    }
    let data = Arc::new(store);
    println!(
        "evstor: NVMe/TCP target on {nvme_addr}, discovery on {}",
        discovery_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    let server_uuid = member
        .as_ref()
        .map(|m| m.server_uuid)
        .or_else(|| bus.state().inventory.servers.keys().next().copied());
    let root_keys = Arc::new(match &member {
        Some(m) => m.root_keys(&cfg.data_dir, cfg.admin_token_lifetime_secs),
        None => RootKeys::in_files(&cfg.data_dir, cfg.admin_token_lifetime_secs),
    });
    let fetcher = crate::idp::fetch::Fetcher::new(cfg.idp_ca_file.as_deref())
        .context("loading CA certificates for IdPs")?;
    let listeners = Arc::new(ListenerControl::default());
    let app = App {
        bus: bus.clone(),
        keys: Default::default(),
        info: Arc::new(ServerInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_endpoint: cfg.api_addr.to_string(),
            nvme_endpoint: nvme_addr.to_string(),
            discovery_endpoint: discovery_addr.unwrap_or(cfg.discovery_addr).to_string(),
            node_uuid: node,
            data_dir: cfg.data_dir.clone(),
            server_uuid,
            api_default: cfg.api_addr,
        }),
        datapath: data.clone(),
        idp: Arc::new(crate::idp::jwks::JwksCache::new(fetcher)),
        listeners: listeners.clone(),
        root_keys: root_keys.clone(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let agent = reconcile::run(bus.clone(), data.clone(), stop_rx.clone(), node);
    let reconciler = tokio::spawn(agent);
    let keeper = tokio::spawn(keys::keep_admin_token(
        bus.clone(),
        root_keys,
        stop_rx.clone(),
    ));
    let tls = tls_config(&cert, &key).context("loading the TLS certificate")?;
    let (api_stop_tx, api_stop_rx) = watch::channel(false);
    let stopper = tokio::spawn(async move {
        stop_requested(shutdown).await;
        let _ = api_stop_tx.send(true);
    });
    println!("evstor: data in {}", cfg.data_dir.display());
    let router = api::router(app, cfg.api.requests);
    let set = listener_set(&bus, listeners, server_uuid, cfg.api_addr);
    let served = edge::serve(set, tls, router, &cfg.api, api_connections_max, api_stop_rx).await;
    let _ = stop_tx.send(true);
    let _ = reconciler.await;
    let _ = keeper.await;
    if let Some(m) = member {
        tokio::task::spawn_blocking(move || m.shutdown()).await?;
    }
    // Last: what was asked before is committed, and nothing writes the journal while the
    // process exits.
    bus.stop().await;
    stopper.abort();
    served.with_context(|| format!("serving the API (--api-addr {})", cfg.api_addr))
}

/// Checks that the ports this server will listen on can be bound, before it joins a
/// cluster: joining records its name and id there, so a server that then could not serve
/// would have taken its name with it (a restart from the same data directory is that same
/// member again, but a fresh one would need another `--name`). The NVMe/TCP, discovery and
/// replication ports always; `--api-addr` on a first start only (a member that has joined
/// listens where the journal records its admin endpoints, if it records any). Port 0 picks
/// a free port, so it is not checked; nor can this stop another process from taking a port
/// between this check and the bind, which then fails as before.
fn ports_free(cfg: &ServeConfig) -> anyhow::Result<()> {
    let mut ports = vec![
        ("--nvme-addr", cfg.nvme_addr),
        ("--discovery-addr", cfg.discovery_addr),
    ];
    if let Some(r) = crate::dataplane::replication_addr(&cfg.nvme_addr.to_string()) {
        ports.push(("the replication port (--nvme-addr's port + 1)", r));
    }
    if !journal_dir(&cfg.data_dir).exists() {
        ports.push(("--api-addr", cfg.api_addr));
    }
    for (what, addr) in ports.into_iter().filter(|(_, a)| a.port() != 0) {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            anyhow::bail!("cannot listen on {addr} ({what}): {e}; not joining the cluster");
        }
    }
    Ok(())
}

/// The API's listeners: this server's admin endpoints as the journal has them (`--api-addr`
/// while none is recorded, and as the fallback).
fn listener_set(
    bus: &Bus,
    control: Arc<ListenerControl>,
    server: Option<Uuid>,
    default: SocketAddr,
) -> edge::ListenerSet {
    let reader = bus.clone();
    edge::ListenerSet {
        control,
        wanted: Box::new(move || match server {
            Some(s) => reader.state().endpoints.addrs(s, default),
            None => vec![default],
        }),
        changed: bus.last_seq(),
        fallback: default,
    }
}

/// The journal, its writer and the cluster it belongs to: the local one-server cluster, or
/// (cluster mode) the etcd-ordered one this server joins.
async fn start_control(cfg: &ServeConfig, cert: &Path) -> anyhow::Result<(Bus, Option<Member>)> {
    if let Some(cc) = &cfg.cluster {
        let m = member::start(cfg, cc, cert).await?;
        return Ok((m.bus.clone(), Some(m)));
    }
    let journal = Arc::new(
        RocksJournal::open(&journal_dir(&cfg.data_dir), OpenMode::ReadWrite)
            .context("opening the journal (is another evstor using this data directory?)")?,
    );
    let bus = Bus::start(journal)?;
    bootstrap(&bus, cfg).await?;
    add_new_devices(&bus, cfg, None).await?;
    Ok((bus, None))
}

/// Resolves when `shutdown` turns true (or its sender is gone), or on SIGINT/SIGTERM if `None`.
async fn stop_requested(shutdown: Option<watch::Receiver<bool>>) {
    match shutdown {
        Some(mut rx) => {
            let _ = rx.wait_for(|stop| *stop).await;
        }
        None => wait_for_signal().await,
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("evstor: shutting down");
}
