//! The primary's namespace backend of a replicated volume: the local image plus one part
//! per in-sync replica for every operation that changes data.

use std::io;
use std::sync::Arc;

use super::{Frame, Link, MemberState, Mode, Op};
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

    /// The control plane recorded this replica out of sync: no more writes go to it, and
    /// the parts held for it complete (their chunks marked dirty).
    pub fn drop_replica(&self) {
        self.state.set_dropped();
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
}

impl Backend for Replicated {
    fn size_bytes(&self) -> u64 {
        self.local.size_bytes()
    }

    unsafe fn submit(&self, q: &mut IoQueue, req: &IoRequest) -> io::Result<()> {
        if req.kind == IoKind::Read {
            // SAFETY: forwarded caller contract.
            return unsafe { self.local.submit(q, req) };
        }
        // A change must reach the replicas: only a driver that counts parts may issue it.
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a replicated volume's writes need a queue that counts replica parts",
        ))
    }

    unsafe fn submit_parts(&self, q: &mut IoQueue, req: &IoRequest) -> io::Result<u32> {
        let op = match req.kind {
            IoKind::Read => {
                // SAFETY: forwarded caller contract.
                return unsafe { self.local.submit(q, req) }.map(|()| 0);
            }
            IoKind::Write { fua } => Op::Write { fua },
            IoKind::WriteZeroes => Op::WriteZeroes,
            IoKind::Deallocate => Op::Deallocate,
            IoKind::Flush => Op::Flush,
        };
        let Some(sink) = q.remote().cloned() else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a replicated volume's writes need a queue with a completion sink",
            ));
        };
        // SAFETY: forwarded caller contract.
        unsafe { self.local.submit(q, req) }?;
        let frame = Frame {
            op,
            volume: self.volume,
            epoch: self.epoch,
            offset: req.offset,
            len: req.len,
            id: 0,
        };
        let mut n = 0;
        for m in &self.members {
            if m.state.mode() == Mode::Dropped {
                m.state.mark(req.offset, u64::from(req.len));
                continue;
            }
            // SAFETY: the caller keeps `req.buf` valid and unchanged until every part of
            // `req.tag` (these included) has completed.
            unsafe { m.link.submit(frame, req.buf, &sink, req.tag, &m.state) };
            n += 1;
        }
        Ok(n)
    }
}
