//! The primary's namespace backend of a replicated volume: the local image plus one part
//! per in-sync replica for every operation that changes data, and for a read when a
//! replica's read lease ran out (a ping that confirms no newer primary exists).

use std::io;
use std::sync::Arc;
use std::time::Instant;

use super::{clock_ns, Frame, Link, MemberState, Mode, Op};
use crate::backend::{Backend, IoKind, IoQueue, IoRequest};

/// One replica of a volume as its primary sees it.
#[derive(Debug)]
pub struct Member {
    /// The link to the replica's server.
    pub link: Arc<Link>,
    /// Its mode and missed chunks (shared with the link's parts).
    pub state: Arc<MemberState>,
}

impl Member {
    /// A replica reached through `link`: in sync, or dropped with everything to copy.
    pub fn new(link: Arc<Link>, size_bytes: u64, in_sync: bool) -> Member {
        Member {
            link,
            state: Arc::new(MemberState::new(size_bytes, in_sync)),
        }
    }

    /// A replica whose copy was current when this primary took over (a failover or
    /// hand-over it saw happen): nothing is to copy but what the copies changed around the
    /// switch (marked by the caller, and asked of the replica: [`super::repair`],
    /// [`super::rebuild`]) and what the replica misses from now on.
    pub fn current(link: Arc<Link>, size_bytes: u64, in_sync: bool) -> Member {
        Member {
            link,
            state: Arc::new(MemberState::current(size_bytes, in_sync)),
        }
    }

    /// The control plane recorded this replica out of sync: no more writes go to it, and
    /// the parts held for it complete (their chunks marked dirty).
    pub fn drop_replica(&self) {
        self.state.set_dropped();
        self.link.sweep();
    }

    /// This server no longer leads the volume: the parts held for the replica, and any
    /// sent to it from now on, fail as fenced (the host retries on the new primary). Not
    /// [`Member::drop_replica`]: nobody recorded the replica out of sync, so a write it
    /// missed must not be acknowledged here.
    pub fn depose(&self) {
        self.state.set_deposed();
        self.link.sweep();
    }
}

/// A volume written to its local image and to every in-sync replica.
#[derive(Debug)]
pub struct Replicated {
    local: Arc<dyn Backend>,
    volume: [u8; 16],
    epoch: u64,
    members: Vec<Arc<Member>>,
}

impl Replicated {
    /// `local` replicated to `members` under `epoch`.
    pub fn new(
        local: Arc<dyn Backend>,
        volume: [u8; 16],
        epoch: u64,
        members: Vec<Arc<Member>>,
    ) -> Replicated {
        Replicated {
            local,
            volume,
            epoch,
            members,
        }
    }

    /// The replicas.
    pub fn members(&self) -> &[Arc<Member>] {
        &self.members
    }

    /// The epoch its writes carry.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Sends one part of `op` for `req` to every replica that takes writes; a replica that
    /// does not only marks what it missed. How many parts were sent.
    ///
    /// # Safety
    /// As [`Backend::submit_parts`]: `req.buf` stays valid and unchanged until every part
    /// of `req.tag` has completed.
    unsafe fn to_replicas(&self, q: &IoQueue, req: &IoRequest, op: Op) -> io::Result<u32> {
        let Some(sink) = q.remote() else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a replicated volume needs a queue with a completion sink",
            ));
        };
        let frame = Frame {
            op,
            volume: self.volume,
            epoch: self.epoch,
            offset: req.offset,
            len: if op == Op::Ping { 0 } else { req.len },
            id: 0,
            session: 0,
        };
        let mut n = 0;
        for m in &self.members {
            // (A deposed member's part is failed by its link.)
            if m.state.mode() == Mode::Dropped {
                if op.changes_data() {
                    m.state.mark(req.offset, u64::from(req.len));
                }
                continue;
            }
            // SAFETY: forwarded caller contract (a ping carries no data).
            unsafe { m.link.submit(frame, req.buf, sink, req.tag, &m.state) };
            n += 1;
        }
        Ok(n)
    }

    /// Whether every replica that takes writes still promises not to serve the volume.
    fn leased(&self) -> bool {
        let now = clock_ns(Instant::now());
        self.members
            .iter()
            .all(|m| m.state.mode() == Mode::Dropped || m.state.leased(now))
    }
}

impl Backend for Replicated {
    fn size_bytes(&self) -> u64 {
        self.local.size_bytes()
    }

    unsafe fn submit(&self, q: &mut IoQueue, req: &IoRequest) -> io::Result<()> {
        if req.kind == IoKind::Read && self.leased() {
            // SAFETY: forwarded caller contract.
            return unsafe { self.local.submit(q, req) };
        }
        // A change must reach the replicas, and a read without a lease must ask them
        // first: only a driver that counts parts may issue either.
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a replicated volume's writes (and reads without a lease) need a queue that \
             counts replica parts",
        ))
    }

    unsafe fn submit_parts(&self, q: &mut IoQueue, req: &IoRequest) -> io::Result<u32> {
        let op = match req.kind {
            // Served locally; while a replica's lease is out, only once every replica
            // answered that it still knows no newer primary (a fenced answer fails it).
            IoKind::Read if self.leased() => {
                // SAFETY: forwarded caller contract.
                return unsafe { self.local.submit(q, req) }.map(|()| 0);
            }
            IoKind::Read => Op::Ping,
            IoKind::Write { fua } => Op::Write { fua },
            IoKind::WriteZeroes => Op::WriteZeroes,
            IoKind::Deallocate => Op::Deallocate,
            IoKind::Flush => Op::Flush,
        };
        if q.remote().is_none() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a replicated volume needs a queue with a completion sink",
            ));
        }
        // SAFETY: forwarded caller contract.
        unsafe { self.local.submit(q, req) }?;
        // SAFETY: forwarded caller contract.
        unsafe { self.to_replicas(q, req, op) }
    }
}
