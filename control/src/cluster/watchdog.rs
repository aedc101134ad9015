//! Ends the etcd lease of a peer whose process is gone, so it is `Failed` (and loses the
//! leadership, if it led) at once instead of when its lease runs out.
//!
//! Every member knocks on each peer's replication listener every [`PEER_PROBE_MS`] (a TCP
//! connect, closed at once). A peer that answered before and now refuses the connection
//! (the host is up, the port closed: the process died, e.g. `kill -9`) while its liveness
//! key still stands on the same lease has that lease revoked. That is safe without any
//! timing assumption: a live process holding that lease would find it gone at its next
//! keep-alive, and everything it could still append is fenced by revision. A peer that
//! does not answer at all (hung, SIGSTOP, machine or network gone) is left to its lease.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::etcd::{EtcdClient, Range};
use super::{AliveRecord, Keys};
use crate::dataplane::replication_addr;
use crate::limits::{PEER_PROBE_MS, PEER_PROBE_TIMEOUT_MS};

/// Starts the watchdog thread of member `me`; it ends when `stop` is set.
pub fn spawn(
    etcd: EtcdClient,
    keys: Keys,
    me: Uuid,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("peer-watchdog".into())
        .spawn(move || {
            // Peers whose listener answered, by the lease their liveness key was on then.
            let mut answered: HashMap<Uuid, i64> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = pass(&etcd, &keys, me, &mut answered) {
                    tracing::debug!("peer watchdog: {e}");
                }
                std::thread::sleep(Duration::from_millis(PEER_PROBE_MS));
            }
        })
}

/// What a knock on a peer's listener says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Knock {
    /// Something accepted the connection.
    Answered,
    /// The host refused it: nothing listens there.
    Refused,
    /// No answer (timeout, unreachable): nothing can be concluded.
    Silent,
}

/// Knocks on `addr` once.
pub fn knock(addr: std::net::SocketAddr) -> Knock {
    match TcpStream::connect_timeout(&addr, Duration::from_millis(PEER_PROBE_TIMEOUT_MS)) {
        Ok(_) => Knock::Answered,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Knock::Refused,
        Err(_) => Knock::Silent,
    }
}

/// Whether a peer's lease must end: it refused now, and answered before on the same lease
/// (a restarted peer on a new lease, or one whose listener never came up, is left alone).
pub fn must_revoke(knock: Knock, answered_on: Option<i64>, lease: i64) -> bool {
    knock == Knock::Refused && answered_on == Some(lease)
}

fn pass(
    etcd: &EtcdClient,
    keys: &Keys,
    me: Uuid,
    answered: &mut HashMap<Uuid, i64>,
) -> Result<(), String> {
    let alive = etcd
        .range(&Range::prefix(&keys.alive_prefix()))
        .map_err(|e| e.to_string())?;
    let peers: Vec<(AliveRecord, i64)> = alive
        .kvs
        .iter()
        .filter_map(|kv| Some((serde_json::from_slice(&kv.value).ok()?, kv.lease)))
        .filter(|(r, _): &(AliveRecord, i64)| r.server_uuid != me)
        .collect();
    answered.retain(|u, _| peers.iter().any(|(r, _)| r.server_uuid == *u));
    for (peer, lease) in peers {
        let Some(addr) = replication_addr(&peer.nvme_endpoint) else {
            continue;
        };
        let k = knock(addr);
        if must_revoke(k, answered.get(&peer.server_uuid).copied(), lease) {
            tracing::warn!(
                server = %peer.name,
                "its replication port refuses connections: the process is gone; ending its \
                 etcd lease so it is failed over now"
            );
            if let Err(e) = etcd.lease_revoke(lease) {
                tracing::info!("revoking the lease of {}: {e}", peer.name);
            }
            answered.remove(&peer.server_uuid);
        } else if k == Knock::Answered {
            answered.insert(peer.server_uuid, lease);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_after_an_answer_on_the_same_lease_ends_it() {
        assert!(must_revoke(Knock::Refused, Some(7), 7));
        assert!(
            !must_revoke(Knock::Refused, None, 7),
            "never answered: maybe still starting"
        );
        assert!(
            !must_revoke(Knock::Refused, Some(6), 7),
            "a new lease: restarted since"
        );
        assert!(
            !must_revoke(Knock::Silent, Some(7), 7),
            "hung or unreachable"
        );
        assert!(!must_revoke(Knock::Answered, Some(7), 7));
    }

    #[test]
    fn a_closed_port_is_refused_and_an_open_one_answers() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        assert_eq!(knock(addr), Knock::Answered);
        drop(l);
        assert_eq!(knock(addr), Knock::Refused);
    }
}
