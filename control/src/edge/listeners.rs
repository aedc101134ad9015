//! The API's listening sockets, changed live. The wanted set comes from the journal (this
//! server's admin endpoints, [`crate::domain::endpoint`]); the edge follows it: it binds what
//! is new, then closes what is gone (its open connections finish their request and close).
//!
//! A change is bound before it is committed: the API [`stage`](ListenerControl::stage)s the
//! new addresses (binding them), submits the change, and commits the staged sockets only if
//! the journal took it; a socket that cannot be bound refuses the change with nothing
//! changed, and the edge adopts staged sockets instead of binding again. After a restart,
//! or for a change committed elsewhere, the edge binds for itself.

use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

/// Sockets bound ahead of a change, and the addresses the edge serves now.
#[derive(Default)]
pub struct ListenerControl {
    /// Bound for a change being submitted (owned by its [`Staged`] guard) or committed and
    /// not yet adopted by the edge.
    staged: Mutex<HashMap<SocketAddr, (TcpListener, bool)>>,
    serving: Mutex<BTreeSet<SocketAddr>>,
}

/// The sockets one change staged; dropped without [`Staged::commit`], they are closed.
pub struct Staged {
    control: Arc<ListenerControl>,
    addrs: Vec<SocketAddr>,
    committed: bool,
}

impl Staged {
    /// The change was committed: the edge may adopt the sockets.
    pub fn commit(mut self) {
        let mut staged = self.control.lock_staged();
        for addr in &self.addrs {
            if let Some(entry) = staged.get_mut(addr) {
                entry.1 = true;
            }
        }
        self.committed = true;
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let mut staged = self.control.lock_staged();
        for addr in &self.addrs {
            staged.remove(addr);
        }
    }
}

impl ListenerControl {
    fn lock_staged(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, (TcpListener, bool)>> {
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The addresses the edge serves now.
    pub fn serving(&self) -> BTreeSet<SocketAddr> {
        self.serving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn set_serving(&self, addrs: BTreeSet<SocketAddr>) {
        *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = addrs;
    }

    /// Binds every address of `addrs` the edge does not serve yet; the first that cannot be
    /// bound fails the whole stage (the others are closed again).
    pub fn stage(
        self: &Arc<Self>,
        addrs: &[SocketAddr],
    ) -> Result<Staged, (SocketAddr, std::io::Error)> {
        let serving = self.serving();
        let mut guard = Staged {
            control: self.clone(),
            addrs: Vec::new(),
            committed: false,
        };
        for addr in addrs.iter().filter(|a| !serving.contains(a)) {
            let listener = bind(*addr).map_err(|e| (*addr, e))?;
            let mut staged = self.lock_staged();
            if staged.contains_key(addr) {
                // Another change staged it and is in flight: binding twice cannot succeed.
                return Err((
                    *addr,
                    std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another change is binding this address",
                    ),
                ));
            }
            staged.insert(*addr, (listener, false));
            guard.addrs.push(*addr);
        }
        Ok(guard)
    }

    /// A staged socket for `addr`, if one was bound ahead.
    pub(super) fn take(&self, addr: SocketAddr) -> Option<TcpListener> {
        self.lock_staged().remove(&addr).map(|(l, _)| l)
    }

    /// Closes committed staged sockets the edge did not adopt (not wanted any more).
    pub(super) fn drop_unwanted(&self, wanted: &[SocketAddr]) {
        self.lock_staged()
            .retain(|addr, (_, committed)| !*committed || wanted.contains(addr));
    }
}

/// A listening socket for the API (non-blocking, as tokio needs it).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[test]
    fn staging_binds_and_an_uncommitted_stage_closes_again() {
        let c = Arc::new(ListenerControl::default());
        let a = free();
        let staged = c.stage(&[a]).unwrap();
        assert!(TcpListener::bind(a).is_err(), "bound by the stage");
        drop(staged);
        assert!(TcpListener::bind(a).is_ok(), "closed with its guard");

        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = held.local_addr().unwrap();
        let b = free();
        let err = c.stage(&[b, taken]).err().unwrap();
        assert_eq!(err.0, taken);
        assert!(
            TcpListener::bind(b).is_ok(),
            "a failed stage keeps nothing bound"
        );

        let staged = c.stage(&[b]).unwrap();
        staged.commit();
        assert!(c.take(b).is_some(), "the edge adopts a committed socket");
        let d = free();
        c.stage(&[d]).unwrap().commit();
        c.drop_unwanted(&[]);
        assert!(
            TcpListener::bind(d).is_ok(),
            "unwanted committed sockets are closed"
        );
    }

    #[test]
    fn addresses_already_served_are_not_bound_again() {
        let c = Arc::new(ListenerControl::default());
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let served = held.local_addr().unwrap();
        c.set_serving([served].into_iter().collect());
        let staged = c.stage(&[served]).unwrap();
        assert!(staged.addrs.is_empty());
    }
}
