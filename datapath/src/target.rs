//! Target lifecycle: listeners, reactors, namespace publication, shutdown.
//!
//! `start` binds the listeners, starts the reactors ([`crate::reactor`]) and returns at
//! once; accept loops and reactors run on their own threads and never call back into the
//! caller, so the control plane (tokio) is never blocked by the data path and vice versa.
//!
//! Every accepted connection goes through the admission ledger ([`crate::admission`])
//! first: a refused one is closed at once; a reclaim closes the victim handshake or tears
//! the victim controller down. An admitted connection is handed to the reactor holding
//! the fewest connections, which owns it until it closes; the thread count does not
//! depend on the number of connections.
//! An accept that fails (out of descriptors, say) is retried with exponential backoff
//! and logged at most once per [`ACCEPT_LOG_INTERVAL_MS`], so the loop neither spins nor
//! floods the log, and serves again as soon as descriptors are free.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::admission::{Caps, ConnKey, Decision, Fds, Ledger, PortClass, Victim};
use crate::backoff::{Backoff, LogLimiter};
use crate::config::{ConnectedHost, NamespaceSpec, TargetConfig};
use crate::ctrl::Registry;
use crate::error::DatapathError;
use crate::limits::{
    ACCEPT_BACKOFF_MS_MAX, ACCEPT_BACKOFF_MS_MIN, ACCEPT_LOG_INTERVAL_MS, MAX_BUFFER_POOL_BYTES,
    MAX_CONNECTIONS_CEILING, MAX_KATO_MS, MAX_REACTORS, MIN_BUFFER_POOL_BYTES,
    POLL_INTERVAL_MS_MAX,
};
use crate::ns::NsTable;
use crate::pool::BufPool;
use crate::reactor::{self, Adopt, Mailbox};

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
    /// The reactors' inboxes (index = reactor).
    pub reactors: Vec<Arc<Mailbox>>,
    /// Round-robin start for picking among equally loaded reactors.
    next_reactor: AtomicUsize,
    /// When the target started (SMART power-on hours).
    pub started: Instant,
    publish: Mutex<()>,
    /// The I/O portals of the subsystem's other targets (a cluster's other servers), which
    /// the discovery log lists after this one's.
    pub peer_portals: RwLock<Vec<SocketAddr>>,
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
                tracing::info!("reclaiming a connection still in its handshake: its port is full");
                // Whichever reactor holds it closes it (a rare event: ask them all).
                for r in &self.reactors {
                    r.post(|m| m.close.push(key));
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
    reactors: Vec<JoinHandle<()>>,
    /// The CPUs the reactors are pinned to (none: unpinned).
    pinned: Vec<usize>,
    /// The reactor threads' kernel ids.
    reactor_tids: Vec<libc::pid_t>,
}

/// Binds the listeners, opens the namespaces, starts the reactors and starts serving.
pub fn start(
    cfg: TargetConfig,
    namespaces: Vec<NamespaceSpec>,
) -> Result<TargetHandle, DatapathError> {
    validate(&cfg)?;
    let table = NsTable::build(namespaces, &NsTable::default(), 1)?;
    let io_l = bind(cfg.nvme_addr)?;
    let disc_l = cfg.discovery_addr.map(bind).transpose()?;
    let cpus = reactor::allowed_cpus();
    let n = cfg.reactor_count(cpus.len());
    let tokens = 2 * (cfg.max_connections + cfg.max_discovery_connections);
    let mailboxes = (0..n)
        .map(|_| Mailbox::new(tokens).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let shared = Arc::new(Shared::new(
        cfg,
        table,
        io_l.local_addr()?,
        disc_l.as_ref().map(|l| l.local_addr()).transpose()?,
        mailboxes,
    )?);
    let mut reactors = Vec::with_capacity(n);
    // Pinned only when the operator gave the data path its cores: an automatic count
    // shares the CPUs with everything else, and a pinned reactor could not move off a
    // CPU that other work (or another target in the same process) keeps busy.
    let pin = shared.cfg.reactors != 0 && !cpus.is_empty();
    let (mut pinned, mut reactor_tids) = (Vec::new(), Vec::new());
    for i in 0..n {
        let cpu = pin.then(|| cpus[i % cpus.len()]);
        pinned.extend(cpu.filter(|c| !pinned.contains(c)));
        match reactor::spawn(i, shared.clone(), cpu) {
            Ok((h, tid)) => {
                reactors.push(h);
                reactor_tids.push(tid);
            }
            Err(e) => {
                stop_reactors(&shared, reactors);
                return Err(e);
            }
        }
    }
    let mut listeners = vec![spawn_acceptor(io_l, shared.clone(), PortClass::Io)?];
    if let Some(l) = disc_l {
        listeners.push(spawn_acceptor(l, shared.clone(), PortClass::Discovery)?);
    }
    tracing::info!(io = %shared.io_addr, discovery = ?shared.disc_addr, nqn = %shared.cfg.subsystem_nqn, reactors = n, "NVMe/TCP target started");
    Ok(TargetHandle {
        shared,
        listeners,
        reactors,
        pinned,
        reactor_tids,
    })
}

impl Shared {
    /// The state every thread of a target shares (reactors not started yet).
    pub fn new(
        cfg: TargetConfig,
        table: NsTable,
        io_addr: SocketAddr,
        disc_addr: Option<SocketAddr>,
        reactors: Vec<Arc<Mailbox>>,
    ) -> Result<Shared, DatapathError> {
        let pool = BufPool::new(cfg.buffer_pool_bytes)?;
        let registry = Mutex::new(Registry::new(cfg.cntlids.clone()));
        Ok(Shared {
            io_addr,
            disc_addr,
            caps: cfg.caps(),
            cfg,
            table: RwLock::new(Arc::new(table)),
            generation: AtomicU64::new(1),
            registry,
            ledger: Mutex::new(Ledger::default()),
            pool,
            shutdown: AtomicBool::new(false),
            reactors,
            next_reactor: AtomicUsize::new(0),
            started: Instant::now(),
            publish: Mutex::new(()),
            peer_portals: RwLock::new(Vec::new()),
        })
    }

    /// The reactor to hand a new connection to: the one holding the fewest connections,
    /// round-robin among equals.
    fn pick_reactor(&self) -> Option<&Arc<Mailbox>> {
        let n = self.reactors.len();
        let start = self.next_reactor.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| &self.reactors[(start + k) % n])
            .min_by_key(|r| r.conns.load(Ordering::Relaxed))
    }
}

/// Asks every reactor to stop and waits for them.
fn stop_reactors(shared: &Shared, reactors: Vec<JoinHandle<()>>) {
    shared.shutdown.store(true, Ordering::Release);
    for r in &shared.reactors {
        r.post(|_| {});
    }
    for h in reactors {
        let _ = h.join();
    }
    // Connections handed over after a reactor's last look (they hold the shared state).
    for r in &shared.reactors {
        r.clear();
    }
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
    if cfg.reactors > MAX_REACTORS {
        return bad(format!("reactors must be 0 (automatic)..={MAX_REACTORS}"));
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
) -> Result<JoinHandle<()>, DatapathError> {
    let name = format!("nvmf-accept-{port:?}").to_lowercase();
    Ok(std::thread::Builder::new()
        .name(name)
        .spawn(move || accept_loop(l, shared, port))?)
}

/// Log limiters of one accept loop.
struct AcceptLogs {
    failed: LogLimiter,
    refused: LogLimiter,
}

fn accept_loop(l: TcpListener, shared: Arc<Shared>, port: PortClass) {
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
                admit(s, peer, &shared, port, &mut logs);
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

/// A counted connection: leaves the ledger on drop (the connection owns it, so whatever
/// ends the connection, on whichever thread, the ledger hears of it once).
pub struct LedgerGuard {
    shared: Arc<Shared>,
    conn: ConnKey,
}

impl std::fmt::Debug for LedgerGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the shared state: it refers back to the mailboxes that hold this guard.
        f.debug_tuple("LedgerGuard").field(&self.conn).finish()
    }
}

impl Drop for LedgerGuard {
    fn drop(&mut self) {
        self.shared.ledger().close_conn(self.conn);
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
    let ledger = LedgerGuard {
        shared: shared.clone(),
        conn,
    };
    // Responses are small and latency-bound: never wait for a delayed ACK.
    if s.set_nodelay(true).is_err() || shared.shutdown.load(Ordering::Acquire) {
        return;
    }
    let Some(r) = shared.pick_reactor() else {
        return;
    };
    // Counted now, not at adoption, so a burst of accepts spreads over the reactors.
    r.conns.fetch_add(1, Ordering::Relaxed);
    let a = Adopt {
        sock: s,
        port,
        key: conn,
        peer,
        accepted,
        ledger,
    };
    r.post(|m| m.adopt.push_back(a));
}

impl TargetHandle {
    /// Gives the reactors their CPUs to themselves: every other thread of the process
    /// (and every thread those start later) is moved to the CPUs the reactors are not
    /// pinned to. Only for a process whose data path was given its cores; does nothing
    /// when the reactors are unpinned or hold every CPU. Returns the CPUs left to the rest.
    pub fn keep_other_threads_off_reactor_cpus(&self) -> Vec<usize> {
        if self.pinned.is_empty() {
            return Vec::new();
        }
        let others: Vec<usize> = reactor::allowed_cpus()
            .into_iter()
            .filter(|c| !self.pinned.contains(c))
            .collect();
        if others.is_empty() {
            tracing::info!("the data path holds every CPU: other threads share them");
            return others;
        }
        reactor::move_threads(&others, &self.reactor_tids);
        tracing::info!(reactors = ?self.pinned, others = ?others, "reactor CPUs kept for the reactors");
        others
    }

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

    /// Returns once every reactor has finished the loop pass it was in (storage issued in a
    /// pass is applied by its end on the block store); fails after `timeout`.
    pub fn pass_barrier(&self, timeout: std::time::Duration) -> Result<(), DatapathError> {
        let deadline = Instant::now() + timeout;
        for m in &self.shared.reactors {
            let at = m.passes.load(Ordering::SeqCst);
            if at % 2 == 0 {
                continue;
            }
            while m.passes.load(Ordering::SeqCst) == at {
                if Instant::now() > deadline {
                    return Err(DatapathError::Closed("a reactor did not finish its pass"));
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        Ok(())
    }

    /// Closes the write gate of the namespace serving image `uuid`, if one does: changes
    /// park until the hold is dropped ([`crate::qos::WriteHold::drained`] waits for those
    /// already admitted).
    pub fn hold_writes(&self, uuid: [u8; 16]) -> Option<crate::qos::WriteHold> {
        let table = self.shared.table();
        let ns = table.list.iter().find(|n| n.spec.uuid == uuid)?;
        Some(ns.qos.hold_writes())
    }

    /// Sets the I/O portals of the subsystem's other targets, listed by discovery (at most
    /// `MAX_DISCOVERY_ENTRIES` in all).
    pub fn set_peer_portals(&self, portals: Vec<SocketAddr>) {
        *self
            .shared
            .peer_portals
            .write()
            .unwrap_or_else(|p| p.into_inner()) = portals;
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

    /// The home for replication links ([`crate::replica::ReplicaHub::hosted`]): the first
    /// reactor, so writes it serves are replicated in the same loop pass.
    pub fn link_home(&self) -> Arc<dyn crate::replica::LinkHome> {
        self.shared.reactors[0].clone()
    }

    /// Threads serving connections (the reactors; they do not grow with connections).
    pub fn reactor_count(&self) -> usize {
        self.shared.reactors.len()
    }

    /// Connections each reactor holds (counted from the moment they are handed over).
    pub fn connections_per_reactor(&self) -> Vec<usize> {
        self.shared
            .reactors
            .iter()
            .map(|r| r.conns.load(Ordering::Relaxed))
            .collect()
    }

    fn stop(&mut self) {
        if self.shared.shutdown.swap(true, Ordering::AcqRel) {
            return;
        }
        let ctrls: Vec<_> = self.shared.registry().all().cloned().collect();
        for c in ctrls {
            c.kill();
        }
        for h in std::mem::take(&mut self.listeners) {
            let _ = h.join();
        }
        stop_reactors(&self.shared, std::mem::take(&mut self.reactors));
        tracing::info!(io = %self.shared.io_addr, "NVMe/TCP target stopped");
    }
}

impl Drop for TargetHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
