//! Target lifecycle: listeners, connection threads, namespace publication, shutdown.
//!
//! `start` binds the listeners and returns at once; accept loops and
//! connections run on their own threads and never call back into the caller,
//! so the control plane (tokio) is never blocked by the data path and vice versa.
//!
//! Every accepted connection goes through the admission ledger ([`crate::admission`])
//! first: a refused one is closed at once; a reclaim closes the victim handshake or tears
//! the victim controller down.
//! An accept that fails (out of descriptors, say) is retried with exponential backoff
//! and logged at most once per [`ACCEPT_LOG_INTERVAL_MS`], so the loop neither spins nor
//! floods the log, and serves again as soon as descriptors are free.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::admission::{Caps, ConnKey, Decision, Fds, Ledger, PortClass, Victim};
use crate::backoff::{Backoff, LogLimiter};
use crate::config::{ConnectedHost, NamespaceSpec, TargetConfig};
use crate::conn;
use crate::ctrl::Registry;
use crate::error::DatapathError;
use crate::limits::{
    ACCEPT_BACKOFF_MS_MAX, ACCEPT_BACKOFF_MS_MIN, ACCEPT_LOG_INTERVAL_MS, MAX_BUFFER_POOL_BYTES,
    MAX_CONNECTIONS_CEILING, MAX_KATO_MS, MIN_BUFFER_POOL_BYTES, POLL_INTERVAL_MS_MAX,
};
use crate::ns::NsTable;
use crate::pool::BufPool;

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
    /// What every connection and controller holds (lock order: registry, controller state,
    /// ledger; nothing is locked while the ledger is held).
    ledger: Mutex<Ledger>,
    /// The admission limits (from `cfg`).
    pub caps: Caps,
    /// The data buffers every queue borrows from.
    pub pool: Arc<BufPool>,
    /// Set once by shutdown; every loop checks it.
    pub shutdown: AtomicBool,
    /// Duplicates of live connection sockets, so shutdown (and a reclaim) can wake
    /// blocked threads.
    sockets: Mutex<Vec<(ConnKey, TcpStream)>>,
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

    /// The admission ledger (always the innermost lock).
    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the handshake or tears down the controller the ledger chose to reclaim.
    fn reclaim(&self, victim: Victim) {
        match victim {
            Victim::Handshake(key) => {
                if let Some((_, s)) = self.sockets().iter().find(|(k, _)| *k == key) {
                    tracing::info!(peer = ?s.peer_addr().ok(),
                        "reclaiming a connection still in its handshake: its port is full");
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
            Victim::Controller(key) => {
                let c = self.registry().all().find(|c| c.ledger_key == key).cloned();
                if let Some(c) = c {
                    tracing::info!(cntlid = c.cntlid, host = %c.host_nqn, remote = %c.remote, discovery = c.discovery,
                        "reclaiming a controller that sees no namespace: its port is full");
                    c.kill();
                }
            }
        }
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
        for c in &ctrls {
            c.namespaces_published(&table);
        }
        // Ledger last: it is always the innermost lock.
        let sees: Vec<_> = ctrls
            .iter()
            .map(|c| (c.ledger_key, c.sees_namespaces()))
            .collect();
        let mut ledger = self.ledger();
        for (key, sees_ns) in sees {
            ledger.set_sees_ns(key, sees_ns);
        }
        drop(ledger);
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
    let pool = BufPool::new(cfg.buffer_pool_bytes)?;
    let shared = Arc::new(Shared {
        io_addr: io_l.local_addr()?,
        disc_addr: disc_l.as_ref().map(|l| l.local_addr()).transpose()?,
        caps: cfg.caps(),
        cfg,
        table: RwLock::new(Arc::new(table)),
        generation: AtomicU64::new(1),
        registry: Mutex::new(Registry::default()),
        ledger: Mutex::new(Ledger::default()),
        pool,
        shutdown: AtomicBool::new(false),
        sockets: Mutex::new(Vec::new()),
        started: Instant::now(),
        publish: Mutex::new(()),
    });
    let conns = Arc::new(Mutex::new(Vec::new()));
    let mut listeners = vec![spawn_acceptor(
        io_l,
        shared.clone(),
        PortClass::Io,
        conns.clone(),
    )?];
    if let Some(l) = disc_l {
        listeners.push(spawn_acceptor(
            l,
            shared.clone(),
            PortClass::Discovery,
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
    let bad = |what: String| Err(DatapathError::Config(what));
    if let Err(e) = crate::nqn::validate(&cfg.subsystem_nqn) {
        return bad(format!("subsystem NQN {:?}: {e}", cfg.subsystem_nqn));
    }
    for (name, v) in [
        ("max_connections", cfg.max_connections),
        ("max_discovery_connections", cfg.max_discovery_connections),
    ] {
        if v == 0 || v > MAX_CONNECTIONS_CEILING {
            return bad(format!("{name} must be 1..={MAX_CONNECTIONS_CEILING}"));
        }
    }
    for (name, v) in [
        ("max_connections_per_host", cfg.max_connections_per_host),
        ("max_controllers_per_host", cfg.max_controllers_per_host),
        ("max_connections_per_addr", cfg.max_connections_per_addr),
        ("max_controllers_per_addr", cfg.max_controllers_per_addr),
    ] {
        if v == 0 {
            return bad(format!("{name} must be at least 1"));
        }
    }
    if !(MIN_BUFFER_POOL_BYTES..=MAX_BUFFER_POOL_BYTES).contains(&cfg.buffer_pool_bytes) {
        return bad(format!(
            "buffer_pool_bytes must be {MIN_BUFFER_POOL_BYTES}..={MAX_BUFFER_POOL_BYTES}"
        ));
    }
    if cfg.handshake_timeout.is_zero() {
        return bad("handshake_timeout must be positive".into());
    }
    if cfg.no_namespace_kato_ms == 0 || cfg.no_namespace_kato_ms > MAX_KATO_MS {
        return bad(format!("no_namespace_kato_ms must be 1..={MAX_KATO_MS}"));
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
    port: PortClass,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
) -> Result<JoinHandle<()>, DatapathError> {
    let name = format!("nvmf-accept-{port:?}").to_lowercase();
    Ok(std::thread::Builder::new()
        .name(name)
        .spawn(move || accept_loop(l, shared, port, conns))?)
}

/// Log limiters of one accept loop.
struct AcceptLogs {
    failed: LogLimiter,
    refused: LogLimiter,
}

fn accept_loop(
    l: TcpListener,
    shared: Arc<Shared>,
    port: PortClass,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let period = Duration::from_millis(ACCEPT_LOG_INTERVAL_MS);
    let mut logs = AcceptLogs {
        failed: LogLimiter::new(period),
        refused: LogLimiter::new(period),
    };
    let mut backoff = Backoff::new(
        Duration::from_millis(ACCEPT_BACKOFF_MS_MIN),
        Duration::from_millis(ACCEPT_BACKOFF_MS_MAX),
    );
    while !shared.shutdown.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one initialised pollfd on the stack, count 1.
        unsafe { libc::poll(&mut pfd, 1, POLL_INTERVAL_MS_MAX as i32) };
        match l.accept() {
            Ok((s, peer)) => {
                backoff.succeeded();
                admit(s, peer, &shared, port, &conns, &mut logs);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE/ENFILE leave the connection in the backlog, so the listener stays
                // readable: without a pause this would spin and log at full speed.
                if let Some(suppressed) = logs.failed.allow(Instant::now()) {
                    tracing::warn!(?port, suppressed, "accept failed: {e}; backing off");
                }
                pause(&shared, backoff.failed());
            }
        }
    }
}

/// Sleeps for `d`, waking early for shutdown.
fn pause(shared: &Shared, d: Duration) {
    let until = Instant::now() + d;
    while !shared.shutdown.load(Ordering::Acquire) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(POLL_INTERVAL_MS_MAX)));
    }
}

/// Descriptors the process has open and may have (RLIMIT_NOFILE, soft).
fn fd_usage() -> Fds {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    let limit = if r != 0 || rl.rlim_cur == libc::RLIM_INFINITY {
        usize::MAX
    } else {
        usize::try_from(rl.rlim_cur).unwrap_or(usize::MAX)
    };
    // Not being able to open the directory means no descriptor is free.
    let open = std::fs::read_dir("/proc/self/fd").map_or(limit, |d| d.count());
    Fds { open, limit }
}

/// A counted connection: leaves the ledger and forgets its socket on drop.
struct ConnSlot {
    shared: Arc<Shared>,
    conn: ConnKey,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let conn = self.conn;
        self.shared.sockets().retain(|(k, _)| *k != conn);
        self.shared.ledger().close_conn(conn);
    }
}

impl Shared {
    fn sockets(&self) -> MutexGuard<'_, Vec<(ConnKey, TcpStream)>> {
        self.sockets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Asks the ledger about a new connection; records it if admitted.
fn decide(shared: &Shared, peer: SocketAddr, port: PortClass) -> Result<ConnKey, Decision> {
    let fds = fd_usage();
    let mut ledger = shared.ledger();
    let d = ledger.decide_accept(&shared.caps, port, peer.ip(), fds);
    match d {
        Decision::Admit => Ok(ledger.open_conn(port, peer.ip())),
        Decision::Reclaim(victim) => {
            ledger.reclaim(victim);
            let conn = ledger.open_conn(port, peer.ip());
            drop(ledger);
            shared.reclaim(victim);
            Ok(conn)
        }
        Decision::Refuse(_) => Err(d),
    }
}

fn admit(
    s: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    port: PortClass,
    conns: &Mutex<Vec<JoinHandle<()>>>,
    logs: &mut AcceptLogs,
) {
    let accepted = Instant::now();
    let conn = match decide(shared, peer, port) {
        Ok(conn) => conn,
        Err(d) => {
            if let Some(suppressed) = logs.refused.allow(accepted) {
                tracing::warn!(%peer, ?port, decision = ?d, suppressed, "connection refused");
            }
            return; // dropping the socket closes it: the peer sees EOF at once
        }
    };
    let guard = ConnSlot {
        shared: shared.clone(),
        conn,
    };
    if s.set_nonblocking(false).is_err() {
        return;
    }
    if let Ok(dup) = s.try_clone() {
        shared.sockets().push((conn, dup));
    }
    if shared.shutdown.load(Ordering::Acquire) {
        return; // raced with shutdown's socket sweep
    }
    let sh = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("nvmf-conn-{peer}"))
        .spawn(move || {
            let _guard = guard;
            conn::serve(s, sh, port, conn, accepted);
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
