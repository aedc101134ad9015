//! The API's network edge: the listener set ([`listeners`]: the admin endpoints, changed
//! live), one accept loop per listening socket, admission of connections (a cap per client
//! address and one in total across every listener, sized from the descriptor budget in
//! [`fds`]), and graceful shutdown. Each admitted connection runs in [`conn`]: the TLS
//! handshake under a deadline, then HTTP/1.1 with header, body and idle deadlines, serving
//! the axum router.
//!
//! Invariant: every open API socket holds one [`Slot`], so the API never holds more
//! descriptors than its cap (plus the one accepted connection being refused), whatever clients
//! do; and no connection outlives its deadlines, so slots come back.

mod conn;
pub mod fds;
pub mod listeners;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::api::admission::RequestCaps;
use crate::limits::{
    API_ACCEPT_BACKOFF_MS, API_BODY_READ_MS, API_CONNECTIONS_PER_ADDR_MAX, API_HEADER_READ_MS,
    API_IDLE_MS, API_SHUTDOWN_GRACE_MS, API_TLS_HANDSHAKE_MS,
};
use listeners::ListenerControl;

/// The edge's bounds; the defaults are those of `limits.rs`, `evstor serve` flags override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeConfig {
    pub tls_handshake_ms: u64,
    pub header_read_ms: u64,
    pub body_read_ms: u64,
    pub idle_ms: u64,
    /// Open connections in total; `None`: [`fds::api_connections_max`] of the open files limit.
    pub connections_max: Option<usize>,
    pub connections_per_addr_max: usize,
    pub requests: RequestCaps,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            tls_handshake_ms: API_TLS_HANDSHAKE_MS,
            header_read_ms: API_HEADER_READ_MS,
            body_read_ms: API_BODY_READ_MS,
            idle_ms: API_IDLE_MS,
            connections_max: None,
            connections_per_addr_max: API_CONNECTIONS_PER_ADDR_MAX,
            requests: RequestCaps::default(),
        }
    }
}

/// Open connections, in total and per client address.
struct Slots {
    total: Arc<Semaphore>,
    total_max: usize,
    /// Connections per address; an entry leaves at zero, so at most `total_max` entries.
    per_addr: Mutex<HashMap<IpAddr, usize>>,
    per_addr_max: usize,
}

/// One open connection's place, given back on drop (when its socket closes).
struct Slot {
    slots: Arc<Slots>,
    addr: IpAddr,
    _total: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_addr = self
            .slots
            .per_addr
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_addr.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                per_addr.remove(&self.addr);
            }
        }
    }
}

impl Slots {
    fn new(total_max: usize, per_addr_max: usize) -> Slots {
        Slots {
            total: Arc::new(Semaphore::new(total_max)),
            total_max,
            per_addr: Mutex::new(HashMap::new()),
            per_addr_max,
        }
    }

    /// A slot for a connection from `addr`, or `None` if either cap is reached.
    fn admit(self: &Arc<Self>, addr: IpAddr) -> Option<Slot> {
        let total = self.total.clone().try_acquire_owned().ok()?;
        let mut per_addr = self.per_addr.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_addr.entry(addr).or_insert(0);
        if *n >= self.per_addr_max {
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: self.clone(),
            addr,
            _total: total,
        })
    }

    /// Waits until every connection closed, at most `grace`.
    async fn drain(&self, grace: Duration) {
        let all = u32::try_from(self.total_max).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(grace, self.total.acquire_many(all)).await;
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The local address a request's connection was accepted on (a request extension): which of
/// this server's admin endpoints the caller uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAddr(pub SocketAddr);

/// What the edge listens on: the addresses `wanted` returns, read again whenever `changed`
/// moves (a commit), with sockets staged through `control` adopted.
pub struct ListenerSet {
    pub control: Arc<ListenerControl>,
    pub wanted: Box<dyn Fn() -> Vec<SocketAddr> + Send + Sync>,
    pub changed: watch::Receiver<u64>,
    /// Served when none of the wanted addresses can be bound, so that a start never locks
    /// the operator out (`--api-addr`).
    pub fallback: SocketAddr,
}

/// What every accept loop shares.
struct Shared {
    slots: Arc<Slots>,
    acceptor: TlsAcceptor,
    router: Router,
    deadlines: conn::Deadlines,
}

/// One listening socket's accept loop; `stop` ends it and winds down its connections.
struct Running {
    stop: watch::Sender<bool>,
}

/// Serves `router` on the listener set until `stop`, with at most `connections_max`
/// connections in total; then lets open requests finish (at most [`API_SHUTDOWN_GRACE_MS`]).
/// Fails at start if nothing, not even the fallback, can be bound.
pub async fn serve(
    set: ListenerSet,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    cfg: &EdgeConfig,
    connections_max: usize,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        slots: Arc::new(Slots::new(connections_max, cfg.connections_per_addr_max)),
        acceptor: TlsAcceptor::from(tls),
        router,
        deadlines: conn::Deadlines::of(cfg),
    });
    let mut running: HashMap<SocketAddr, Running> = HashMap::new();
    reconcile(&set, &shared, &mut running)?;
    let mut changed = set.changed.clone();
    loop {
        tokio::select! {
            moved = changed.changed() => {
                if moved.is_err() {
                    stopped(&mut stop).await;
                    break;
                }
                if let Err(e) = reconcile(&set, &shared, &mut running) {
                    tracing::error!("API listeners: {e}");
                }
            }
            _ = stopped(&mut stop) => break,
        }
    }
    for r in running.values() {
        let _ = r.stop.send(true);
    }
    set.control.set_serving(Default::default());
    shared
        .slots
        .drain(Duration::from_millis(API_SHUTDOWN_GRACE_MS))
        .await;
    Ok(())
}

/// Binds the wanted addresses not served yet, then stops serving the unwanted ones; if that
/// leaves nothing served, serves the fallback.
fn reconcile(
    set: &ListenerSet,
    shared: &Arc<Shared>,
    running: &mut HashMap<SocketAddr, Running>,
) -> std::io::Result<()> {
    let wanted = (set.wanted)();
    set.control.drop_unwanted(&wanted);
    let missing: Vec<SocketAddr> = wanted
        .iter()
        .filter(|a| !running.contains_key(a))
        .copied()
        .collect();
    for addr in &missing {
        match start_listener(set, shared, *addr) {
            Ok(r) => {
                running.insert(*addr, r);
            }
            Err(e) => tracing::error!("API: cannot listen on {addr}: {e}"),
        }
    }
    let unwanted: Vec<SocketAddr> = running
        .keys()
        .filter(|a| !wanted.contains(a))
        .copied()
        .collect();
    let has_wanted = running.keys().any(|a| wanted.contains(a));
    for addr in unwanted {
        if !has_wanted && addr == set.fallback {
            continue; // still the only way in
        }
        if let Some(r) = running.remove(&addr) {
            let _ = r.stop.send(true);
            println!("evstor: stopped serving the API on {addr}");
        }
    }
    if running.is_empty() {
        tracing::error!(
            "none of this server's admin endpoints can be bound; serving --api-addr {} instead",
            set.fallback
        );
        let r = start_listener(set, shared, set.fallback)?;
        running.insert(set.fallback, r);
    }
    set.control.set_serving(running.keys().copied().collect());
    Ok(())
}

fn start_listener(
    set: &ListenerSet,
    shared: &Arc<Shared>,
    addr: SocketAddr,
) -> std::io::Result<Running> {
    let std_listener = match set.control.take(addr) {
        Some(l) => l,
        None => listeners::bind(addr)?,
    };
    let listener = TcpListener::from_std(std_listener)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(accept_loop(listener, shared.clone(), stop_rx));
    println!("evstor: serving the LightOS API v2 on https://{addr}");
    Ok(Running { stop: stop_tx })
}

/// Accepts connections on one listener until `stop`; each connection winds down (finishes
/// its request, then closes) when `stop` fires too.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stopped(&mut stop) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                accept_failed(&e, &mut failing).await;
                continue;
            }
        };
        failing = false;
        let Some(slot) = shared.slots.admit(peer.ip()) else {
            tracing::debug!(%peer, "API connection refused: connection cap reached");
            continue; // dropping `tcp` closes it
        };
        let conn = conn::run(
            tcp,
            slot,
            shared.acceptor.clone(),
            shared.router.clone(),
            shared.deadlines,
            stop.clone(),
        );
        tokio::spawn(conn);
    }
}

/// After a failed accept(2): a short pause when the process is out of descriptors or memory
/// (retrying at once would spin), nothing for a connection the client already dropped.
async fn accept_failed(e: &std::io::Error, failing: &mut bool) {
    let scarce = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if !scarce {
        tracing::debug!("API accept: {e}");
        return;
    }
    if !*failing {
        tracing::warn!("API accept: {e}; backing off");
        *failing = true;
    }
    tokio::time::sleep(Duration::from_millis(API_ACCEPT_BACKOFF_MS)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_per_address_and_in_total() {
        let slots = Arc::new(Slots::new(3, 2));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = slots.admit(a).unwrap();
        let _a2 = slots.admit(a).unwrap();
        assert!(slots.admit(a).is_none(), "per-address cap");
        let b1 = slots.admit(b).unwrap();
        assert!(slots.admit(b).is_none(), "total cap");
        drop(b1);
        assert!(slots.admit(a).is_none(), "per-address cap still");
        drop(a1);
        let _a3 = slots.admit(a).unwrap();
        assert_eq!(slots.per_addr.lock().unwrap().len(), 1);
    }
}
