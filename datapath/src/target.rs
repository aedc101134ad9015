//! Target lifecycle: listeners, connection threads, namespace publication, shutdown.
//!
//! `start` binds the listeners and returns at once; accept loops and
//! connections run on their own threads and never call back into the caller,
//! so the control plane (tokio) is never blocked by the data path and vice versa.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{ConnectedHost, NamespaceSpec, TargetConfig};
use crate::conn::{self, PortKind};
use crate::ctrl::Registry;
use crate::error::DatapathError;
use crate::limits::{MAX_CONNECTIONS_CEILING, NQN_BYTES, POLL_INTERVAL_MS_MAX};
use crate::ns::NsTable;

/// State shared by every thread of one target.
#[derive(Debug)]
pub struct Shared {
    /// Configuration as started.
    pub cfg: TargetConfig,
    /// Bound I/O address.
    pub io_addr: SocketAddr,
    /// Bound discovery address.
    pub disc_addr: Option<SocketAddr>,
    table: RwLock<Arc<NsTable>>,
    /// Generation of the published table (connections compare against their copy).
    pub generation: AtomicU64,
    registry: Mutex<Registry>,
    /// Set once by shutdown; every loop checks it.
    pub shutdown: AtomicBool,
    live_conns: AtomicUsize,
    /// Duplicates of live connection sockets, so shutdown can wake blocked threads.
    sockets: Mutex<Vec<(u64, TcpStream)>>,
    next_socket_id: AtomicU64,
    /// When the target started (SMART power-on hours).
    pub started: Instant,
    publish: Mutex<()>,
}

impl Shared {
    /// The current namespace table.
    pub fn table(&self) -> Arc<NsTable> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The controller registry. Poisoning is ignored: the registry is plain data.
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, specs: Vec<NamespaceSpec>) -> Result<(), DatapathError> {
        let _serial = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.table();
        let gen = old.generation + 1;
        let (table, err) = NsTable::build_lenient(specs, &old, gen);
        let table = Arc::new(table);
        // Swap under the registry lock: an admin Connect (which reads the table under the
        // same lock) either sees the new table or is already registered to be told.
        let ctrls: Vec<_> = {
            let reg = self.registry();
            *self.table.write().unwrap_or_else(|p| p.into_inner()) = table.clone();
            self.generation.store(gen, Ordering::Release);
            reg.all().cloned().collect()
        };
        for c in ctrls {
            c.namespaces_published(&table);
        }
        err.map_or(Ok(()), Err)
    }
}

/// A running target. Dropping it stops it, as [`TargetHandle::shutdown`] does.
#[derive(Debug)]
pub struct TargetHandle {
    shared: Arc<Shared>,
    listeners: Vec<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// Binds the listeners, opens the namespaces and starts serving.
pub fn start(
    cfg: TargetConfig,
    namespaces: Vec<NamespaceSpec>,
) -> Result<TargetHandle, DatapathError> {
    validate(&cfg)?;
    let table = NsTable::build(namespaces, &NsTable::default(), 1)?;
    let io_l = bind(cfg.nvme_addr)?;
    let disc_l = cfg.discovery_addr.map(bind).transpose()?;
    let shared = Arc::new(Shared {
        io_addr: io_l.local_addr()?,
        disc_addr: disc_l.as_ref().map(|l| l.local_addr()).transpose()?,
        cfg,
        table: RwLock::new(Arc::new(table)),
        generation: AtomicU64::new(1),
        registry: Mutex::new(Registry::default()),
        shutdown: AtomicBool::new(false),
        live_conns: AtomicUsize::new(0),
        sockets: Mutex::new(Vec::new()),
        next_socket_id: AtomicU64::new(0),
        started: Instant::now(),
        publish: Mutex::new(()),
    });
    let conns = Arc::new(Mutex::new(Vec::new()));
    let mut listeners = vec![spawn_acceptor(
        io_l,
        shared.clone(),
        PortKind::Io,
        conns.clone(),
    )?];
    if let Some(l) = disc_l {
        listeners.push(spawn_acceptor(
            l,
            shared.clone(),
            PortKind::Discovery,
            conns.clone(),
        )?);
    }
    tracing::info!(io = %shared.io_addr, discovery = ?shared.disc_addr, nqn = %shared.cfg.subsystem_nqn, "NVMe/TCP target started");
    Ok(TargetHandle {
        shared,
        listeners,
        conns,
    })
}

fn validate(cfg: &TargetConfig) -> Result<(), DatapathError> {
    if cfg.subsystem_nqn.is_empty() || cfg.subsystem_nqn.len() >= NQN_BYTES {
        return Err(DatapathError::Config(
            "subsystem NQN must be 1..=255 bytes".into(),
        ));
    }
    if cfg.max_connections == 0 || cfg.max_connections > MAX_CONNECTIONS_CEILING {
        return Err(DatapathError::Config(format!(
            "max_connections must be 1..={MAX_CONNECTIONS_CEILING}"
        )));
    }
    Ok(())
}

fn bind(addr: SocketAddr) -> Result<TcpListener, DatapathError> {
    let l = TcpListener::bind(addr).map_err(|source| DatapathError::Listen { addr, source })?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn spawn_acceptor(
    l: TcpListener,
    shared: Arc<Shared>,
    port: PortKind,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
) -> Result<JoinHandle<()>, DatapathError> {
    let name = format!("nvmf-accept-{port:?}").to_lowercase();
    Ok(std::thread::Builder::new()
        .name(name)
        .spawn(move || accept_loop(l, shared, port, conns))?)
}

fn accept_loop(
    l: TcpListener,
    shared: Arc<Shared>,
    port: PortKind,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    while !shared.shutdown.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one initialised pollfd on the stack, count 1.
        unsafe { libc::poll(&mut pfd, 1, POLL_INTERVAL_MS_MAX as i32) };
        match l.accept() {
            Ok((s, peer)) => admit(s, peer, &shared, port, &conns),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// A counted connection: decrements the live count and forgets its socket on drop.
struct ConnSlot {
    shared: Arc<Shared>,
    socket_id: Option<u64>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some(id) = self.socket_id {
            self.shared.sockets().retain(|(i, _)| *i != id);
        }
        self.shared.live_conns.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    fn sockets(&self) -> MutexGuard<'_, Vec<(u64, TcpStream)>> {
        self.sockets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn admit(
    s: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    port: PortKind,
    conns: &Mutex<Vec<JoinHandle<()>>>,
) {
    let live = shared.live_conns.fetch_add(1, Ordering::AcqRel);
    let mut guard = ConnSlot {
        shared: shared.clone(),
        socket_id: None,
    };
    if live >= shared.cfg.max_connections {
        tracing::warn!(%peer, "connection limit reached; refusing");
        return;
    }
    if s.set_nonblocking(false).is_err() {
        return;
    }
    if let Ok(dup) = s.try_clone() {
        let id = shared.next_socket_id.fetch_add(1, Ordering::Relaxed);
        shared.sockets().push((id, dup));
        guard.socket_id = Some(id);
    }
    if shared.shutdown.load(Ordering::Acquire) {
        return; // raced with shutdown's socket sweep
    }
    let sh = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("nvmf-conn-{peer}"))
        .spawn(move || {
            let _guard = guard;
            conn::serve(s, sh, port);
        });
    let mut list = conns.lock().unwrap_or_else(|p| p.into_inner());
    list.retain(|h| !h.is_finished());
    match spawned {
        Ok(h) => list.push(h),
        Err(e) => tracing::warn!("cannot spawn connection thread: {e}"),
    }
}

impl TargetHandle {
    /// The bound I/O address (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.io_addr
    }

    /// The bound discovery address, if a discovery listener was configured.
    pub fn discovery_addr(&self) -> Option<SocketAddr> {
        self.shared.disc_addr
    }

    /// Publishes a new namespace table. Namespaces whose backing file cannot be opened
    /// are left out (and logged); use [`TargetHandle::try_set_namespaces`] to see why.
    pub fn set_namespaces(&self, namespaces: Vec<NamespaceSpec>) {
        if let Err(e) = self.shared.publish(namespaces) {
            tracing::warn!("namespace publication incomplete: {e}");
        }
    }

    /// As [`TargetHandle::set_namespaces`], returning the first namespace that failed to open.
    pub fn try_set_namespaces(&self, namespaces: Vec<NamespaceSpec>) -> Result<(), DatapathError> {
        self.shared.publish(namespaces)
    }

    /// Whether the published table serves namespace `nsid` as the image `uuid`.
    pub fn serves(&self, nsid: u32, uuid: [u8; 16]) -> bool {
        self.shared
            .table()
            .get(nsid)
            .is_some_and(|n| n.spec.uuid == uuid)
    }

    /// Live host sessions (I/O controllers; discovery sessions are not listed).
    pub fn connected_hosts(&self) -> Vec<ConnectedHost> {
        let reg = self.shared.registry();
        reg.all()
            .filter(|c| !c.discovery && !c.is_dead())
            .map(|c| {
                let st = c.state();
                ConnectedHost {
                    host_nqn: c.host_nqn.clone(),
                    host_id: c.host_id,
                    remote_addr: c.remote,
                    cntlid: c.cntlid,
                    io_queues: st.io_queues.len(),
                    nsids: st.seen.iter().map(|s| s.nsid).collect(),
                }
            })
            .collect()
    }

    /// Stops accepting, ends every connection and waits for the threads.
    pub fn shutdown(self) {
        drop(self);
    }

    fn stop(&mut self) {
        if self.shared.shutdown.swap(true, Ordering::AcqRel) {
            return;
        }
        let ctrls: Vec<_> = self.shared.registry().all().cloned().collect();
        for c in ctrls {
            c.kill();
        }
        for (_, s) in self.shared.sockets().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for h in std::mem::take(&mut self.listeners) {
            let _ = h.join();
        }
        let list = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|p| p.into_inner()));
        for h in list {
            let _ = h.join();
        }
        tracing::info!(io = %self.shared.io_addr, "NVMe/TCP target stopped");
    }
}

impl Drop for TargetHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
