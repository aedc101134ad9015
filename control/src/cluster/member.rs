//! Starting a cluster member (`evstor serve --etcd … --name …`): bring the local journal up
//! to the cluster log (from etcd, or from a peer's checkpoint when etcd's tail has moved
//! past it), start the writer and the follower, take the cluster's root key from etcd (the
//! first server creates it), bootstrap the cluster if the etcd prefix is empty (a
//! compare-and-swap: of two servers racing, one bootstraps and the other joins), register
//! this server if it is new (on its first start it takes the id of a server created
//! through the API for one of its addresses, `domain::creation`), and start the session
//! and the orchestrator (`admin.jwt` is the keeper's, [`crate::keys`]).
//!
//! Trust: the root private key lives in etcd (`<prefix>root-key`) so that every member can
//! mint the admin token and verify the same tokens. Whoever can read etcd is therefore a
//! cluster admin; in production, reach etcd only over a private network with etcd's client
//! TLS and authentication (this client speaks plain HTTP for now, see [`super::etcd`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use evstor_journal::{EventLog, OpenMode, RocksJournal};
use uuid::Uuid;

use super::etcd::{Compare, EtcdClient, EtcdError, Op, OpResult, Range};
use super::log::{ClusterLog, Fetched};
use super::orchestrator::Orchestrator;
use super::session::{alive_servers, Session};
use super::{checkpoint, follow, AliveRecord, ClusterConfig, Keys};
use crate::domain::cluster::{Bootstrap, Command as ClusterCommand};
use crate::domain::creation;
use crate::domain::inventory::{Command as InventoryCommand, Join, ServerState};
use crate::domain::{Command, DomainError};
use crate::error::ControlError;
use crate::keys::RootKeys;
use crate::limits::ETCD_START_WAIT_MS;
use crate::server::{self, ServeConfig};
use crate::store::{replay, Bus, RequestMeta};

/// Times a start tries to bring its journal up to the log before giving up.
const CATCH_UP_ATTEMPTS: usize = 5;
/// Lifetime of the token a member shows a peer to fetch a checkpoint.
const PEER_TOKEN_SECS: u64 = 300;

/// A running member's cluster machinery.
pub struct Member {
    pub bus: Bus,
    pub server_uuid: Uuid,
    pub node_uuid: Uuid,
    session: Session,
    stop: Arc<AtomicBool>,
    orchestrator: Option<std::thread::JoinHandle<()>>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    etcd: EtcdClient,
    keys: Keys,
}

impl Member {
    /// The cluster's root keys, kept in etcd.
    pub fn root_keys(&self, data_dir: &Path, admin_lifetime_secs: u64) -> RootKeys {
        RootKeys::in_etcd(
            data_dir,
            self.etcd.fork(),
            self.keys.clone(),
            admin_lifetime_secs,
        )
    }

    /// Leaves: the orchestrator stops, and the lease is revoked (the others see this server
    /// down at once).
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in [self.orchestrator.take(), self.watchdog.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
        self.session.stop();
    }
}

/// This server's id, kept in the data directory with the name it was given; `None` on
/// the first start (the id is chosen once the cluster's state is known: [`adopt_identity`]).
fn identity(data_dir: &Path, name: &str) -> anyhow::Result<Option<Uuid>> {
    let path = data_dir.join("server-id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let (uuid, stored_name) = text
            .trim()
            .split_once(' ')
            .with_context(|| format!("{} is damaged", path.display()))?;
        anyhow::ensure!(
            stored_name == name,
            "this data directory belongs to server {stored_name:?}; it cannot start as {name:?}"
        );
        return Ok(Some(uuid.parse()?));
    }
    Ok(None)
}

/// Waits (bounded) until the local state holds everything etcd's log held when asked: a
/// server created through the API for this one must be known before it picks its id.
async fn wait_caught_up(bus: &Bus, etcd: &EtcdClient, keys: &Keys) -> anyhow::Result<()> {
    let log = ClusterLog::new(etcd.fork(), keys.clone());
    let head = tokio::task::spawn_blocking(move || log.read_head()).await??;
    let Some(target) = head.map(|h| h.head.last_seq()) else {
        return Ok(()); // no cluster yet: this server bootstraps it
    };
    let mut applied = bus.last_seq();
    tokio::time::timeout(
        Duration::from_millis(ETCD_START_WAIT_MS),
        applied.wait_for(|seq| *seq >= target),
    )
    .await
    .context("catching up with the cluster log took too long")?
    .context("the journal writer stopped")?;
    Ok(())
}

/// The id of a server starting for the first time: that of the server created through
/// the API (`CreateServer`) with one of its addresses as endpoint, else `fresh`. Kept in
/// the data directory from now on.
fn adopt_identity(
    data_dir: &Path,
    cfg: &ServeConfig,
    name: &str,
    state: &crate::domain::State,
    fresh: Uuid,
) -> anyhow::Result<Uuid> {
    let addresses = [cfg.api_addr.to_string(), cfg.nvme_addr.to_string()];
    let uuid = creation::created_for(state, &addresses).unwrap_or(fresh);
    if uuid != fresh {
        println!("evstor: joining as server {uuid}, created through the API for this address");
    }
    server::write_private(&data_dir.join("server-id"), &format!("{uuid} {name}\n"))?;
    Ok(uuid)
}

/// Waits (bounded) for etcd to answer.
fn wait_for_etcd(etcd: &EtcdClient) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(ETCD_START_WAIT_MS);
    loop {
        match etcd.status() {
            Ok(_) => return Ok(()),
            // A wrong password or missing rights: waiting will not change etcd's mind.
            Err(e @ EtcdError::Refused { .. }) => {
                return Err(e).context("etcd refused this server")
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context("etcd did not answer at start")
            }
            Err(e) => tracing::warn!("waiting for etcd: {e}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The cluster's root private key (PEM) from etcd; the first to ask creates it.
fn root_key(etcd: &EtcdClient, keys: &Keys) -> anyhow::Result<String> {
    let key = keys.root_key();
    if let Some(kv) = etcd.get(&key)? {
        return Ok(String::from_utf8(kv.value)?);
    }
    let (private, _) = server::generate_root_key()?;
    let t = etcd.txn(
        &[Compare::CreateRevision(key.clone(), 0)],
        &[Op::Put {
            key: key.clone(),
            value: private.clone().into_bytes(),
            lease: 0,
        }],
        &[Op::Range(Range::key(&key))],
    )?;
    if t.succeeded {
        return Ok(private);
    }
    match t.responses.first() {
        Some(OpResult::Range(r)) if !r.kvs.is_empty() => {
            Ok(String::from_utf8(r.kvs[0].value.clone())?)
        }
        _ => anyhow::bail!("the cluster root key vanished from etcd"),
    }
}

fn mint_admin(root_pem: &str, subject: &str, lifetime: u64) -> anyhow::Result<String> {
    crate::api::auth::mint(
        root_pem,
        crate::api::auth::ROOT_KID,
        subject,
        &["system:cluster-admin".to_string()],
        Default::default(),
        lifetime,
    )
}

/// The key most likely to be the root key now, before this server's journal can say: the
/// newest one a rotation stored (a refused rotation removes its key), else the first one.
fn newest_root_key(etcd: &EtcdClient, keys: &Keys, first: &str) -> anyhow::Result<String> {
    let stored = etcd.range(&Range::prefix(&keys.root_keys_prefix()))?.kvs;
    match stored.into_iter().max_by_key(|kv| kv.create_revision) {
        Some(kv) => Ok(String::from_utf8(kv.value)?),
        None => Ok(first.to_string()),
    }
}

/// Opens the journal at or past etcd's tail, fetching a peer's checkpoint when needed.
fn open_caught_up(
    data_dir: &Path,
    etcd: &EtcdClient,
    keys: &Keys,
    server_uuid: Uuid,
    root_pem: &str,
) -> anyhow::Result<(Arc<RocksJournal>, ClusterLog)> {
    let dir = server::journal_dir(data_dir);
    for _ in 0..CATCH_UP_ATTEMPTS {
        let journal = RocksJournal::open(&dir, OpenMode::ReadWrite)
            .context("opening the journal (is another evstor using this data directory?)")?;
        let local = journal.head();
        let mut log = ClusterLog::new(etcd.fork(), keys.clone());
        let stored = log.sync(&local)?;
        if stored.is_none() && local.next_seq > 1 {
            anyhow::bail!(
                "this journal holds {} events but etcd has no cluster under {}: wrong \
                 --etcd-prefix, or etcd lost its data",
                local.last_seq(),
                keys.prefix()
            );
        }
        match log.fetch(local.next_seq)? {
            Fetched::Batches(_) => return Ok((Arc::new(journal), log)),
            Fetched::TailPassed { head_next_seq, .. } => {
                drop(journal);
                println!(
                    "evstor: the journal (seq {}) is behind etcd's tail (seq {head_next_seq}); \
                     fetching a checkpoint from a peer",
                    local.last_seq()
                );
                fetch_from_a_peer(data_dir, etcd, keys, server_uuid, root_pem)?;
            }
        }
    }
    anyhow::bail!("could not bring the journal up to the cluster log's tail")
}

fn fetch_from_a_peer(
    data_dir: &Path,
    etcd: &EtcdClient,
    keys: &Keys,
    server_uuid: Uuid,
    root_pem: &str,
) -> anyhow::Result<()> {
    let token = mint_admin(
        &newest_root_key(etcd, keys, root_pem)?,
        &format!("evstor-peer:{server_uuid}"),
        PEER_TOKEN_SECS,
    )?;
    let incoming: PathBuf = data_dir.join("journal.incoming");
    let mut last = anyhow::anyhow!("no live peer to fetch a checkpoint from");
    for peer in alive_servers(etcd, keys)? {
        if peer.server_uuid == server_uuid {
            continue;
        }
        let _ = std::fs::remove_dir_all(&incoming);
        let fetched = checkpoint::fetch(&peer, &token, &incoming).and_then(|bytes| {
            check_journal(&incoming)?;
            Ok(bytes)
        });
        match fetched {
            Ok(bytes) => {
                checkpoint::install(&incoming, &server::journal_dir(data_dir))?;
                println!(
                    "evstor: installed a journal checkpoint of {bytes} bytes from {}",
                    peer.name
                );
                return Ok(());
            }
            Err(e) => {
                tracing::warn!("checkpoint from {} failed: {e:#}", peer.name);
                last = e;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&incoming);
    Err(last)
}

/// A fetched journal must be intact and its rows what its events imply.
fn check_journal(dir: &Path) -> anyhow::Result<()> {
    let j = RocksJournal::open(dir, OpenMode::ReadOnly)?;
    let report = j.verify()?;
    anyhow::ensure!(
        report.is_ok(),
        "the checkpoint does not verify: {:?}",
        report.problems
    );
    let diff = replay::compare_projections(&j)?;
    anyhow::ensure!(
        diff.differing_keys.is_empty(),
        "the checkpoint's rows differ from its events: {:?}",
        diff.differing_keys
    );
    Ok(())
}

/// Joins (or bootstraps) the cluster and starts the member's threads.
pub async fn start(cfg: &ServeConfig, cc: &ClusterConfig, cert: &Path) -> anyhow::Result<Member> {
    let keys = Keys::new(&cc.prefix);
    let mut etcd = EtcdClient::new(cc.endpoints.clone());
    if let Some(tls) = &cc.tls {
        etcd = etcd.with_tls(tls.clone());
    }
    if let Some(auth) = &cc.auth {
        etcd = etcd.with_auth(auth.clone());
    }
    let stored_uuid = identity(&cfg.data_dir, &cc.name)?;
    // Before the id is known, a first start catches up under a provisional one (it only
    // names this server to the peer it may fetch a checkpoint from).
    let provisional = stored_uuid.unwrap_or_else(Uuid::new_v4);
    let server_uuid = provisional;
    let (journal, log, root_pem) = {
        let (etcd, keys, data_dir) = (etcd.fork(), keys.clone(), cfg.data_dir.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            wait_for_etcd(&etcd)?;
            let root_pem = root_key(&etcd, &keys)?;
            let (journal, log) = open_caught_up(&data_dir, &etcd, &keys, server_uuid, &root_pem)?;
            Ok((journal, log, root_pem))
        })
        .await??
    };
    server::write_private(&server::root_key_path(&cfg.data_dir), &root_pem)?;
    let bus = Bus::start_cluster(journal, log)?;
    let stop = Arc::new(AtomicBool::new(false));
    follow::spawn(etcd.fork(), keys.clone(), bus.remote_feed(), stop.clone())?;
    let server_uuid = match stored_uuid {
        Some(uuid) => uuid,
        None => {
            wait_caught_up(&bus, &etcd, &keys).await?;
            adopt_identity(&cfg.data_dir, cfg, &cc.name, &bus.state(), provisional)?
        }
    };
    let record = AliveRecord {
        server_uuid,
        name: cc.name.clone(),
        api_endpoint: cfg.api_addr.to_string(),
        nvme_endpoint: cfg.nvme_addr.to_string(),
        cert_sha256: checkpoint::cert_file_fingerprint(cert)?,
    };
    let session = Session::spawn(etcd.fork(), keys.clone(), record)?;
    let watchdog = super::watchdog::spawn(etcd.fork(), keys.clone(), server_uuid, stop.clone())?;
    register(&bus, cfg, cc, server_uuid, &root_pem).await?;
    let node_uuid = bus
        .state()
        .inventory
        .node_of(server_uuid)
        .map(|n| n.uuid)
        .context("this server has no node in the cluster")?;
    server::add_new_devices(&bus, cfg, Some(node_uuid)).await?;
    let token_path = cfg.data_dir.join("admin.jwt");
    let keys_for_member = keys.clone();
    let orchestrator = Orchestrator {
        etcd: etcd.fork(),
        keys,
        bus: bus.clone(),
        runtime: tokio::runtime::Handle::current(),
        view: session.view_handle(),
        server_uuid,
        tail_batches: cc.tail_batches,
        stop: stop.clone(),
        ignore_lease: failpoint_ignore_lease(),
        eviction_progress: Default::default(),
    }
    .spawn()?;
    println!(
        "evstor: member {} ({server_uuid}) of the cluster at {} (etcd prefix {}); admin token at {}",
        cc.name,
        cc.endpoints.join(","),
        cc.prefix,
        token_path.display()
    );
    Ok(Member {
        bus,
        server_uuid,
        node_uuid,
        session,
        stop,
        orchestrator: Some(orchestrator),
        watchdog: Some(watchdog),
        etcd,
        keys: keys_for_member,
    })
}

fn failpoint_ignore_lease() -> bool {
    let armed = std::env::var("EVSTOR_FAILPOINT").is_ok_and(|f| f == "orchestrator-ignore-lease");
    if armed {
        tracing::warn!("failpoint armed: the orchestrator ignores its lease deadline");
    }
    armed
}

/// Bootstraps the cluster if nobody has, then registers this server if it is new.
async fn register(
    bus: &Bus,
    cfg: &ServeConfig,
    cc: &ClusterConfig,
    server_uuid: Uuid,
    root_pem: &str,
) -> anyhow::Result<()> {
    let devices = server::prepare_devices(cfg)?
        .iter()
        .map(|p| server::device_record(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !bus.state().cluster.initialized {
        let b = Bootstrap {
            hostname: cc.name.clone(),
            api_endpoint: cfg.api_addr.to_string(),
            nvme_endpoint: cfg.nvme_addr.to_string(),
            devices: devices.clone(),
            root_public_key_pem: crate::keys::public_of(root_pem)?,
            server_uuid: Some(server_uuid),
            failure_domain: cc.failure_domain.clone(),
        };
        let cmd = Command::Cluster(ClusterCommand::Bootstrap(b));
        match bus.submit(RequestMeta::system("bootstrap"), cmd).await {
            Ok(_) => println!("evstor: bootstrapped a new cluster under {}", cc.prefix),
            // Another server bootstrapped first: join it.
            Err(ControlError::Domain(DomainError::AlreadyExists(_))) => {
                println!("evstor: another server bootstrapped the cluster first; joining it")
            }
            Err(e) => return Err(e).context("bootstrapping the cluster"),
        }
    }
    let joined = bus
        .state()
        .inventory
        .servers
        .get(&server_uuid)
        .is_some_and(|s| s.state != ServerState::Creating);
    if joined {
        return Ok(());
    }
    let join = Join {
        server_uuid,
        name: cc.name.clone(),
        api_endpoint: cfg.api_addr.to_string(),
        nvme_endpoint: cfg.nvme_addr.to_string(),
        failure_domain: cc.failure_domain.clone(),
        devices,
    };
    bus.submit(
        RequestMeta::system("join"),
        Command::Inventory(InventoryCommand::JoinServer(join)),
    )
    .await
    .context("joining the cluster")?;
    println!("evstor: joined the cluster as {}", cc.name);
    Ok(())
}
