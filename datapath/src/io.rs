//! NVM I/O commands: Read, Write, Flush, Write Zeroes, Dataset Management.
//!
//! Commands are validated here and turned into storage operations the queue's driver
//! issues to the namespace's backend ([`Queue::push_submit`]); [`account_completion`]
//! records each as it finishes. Reads and writes pass the namespace's QoS buckets first;
//! Flush, Write Zeroes and Dataset Management are not throttled. Every change (Write,
//! Write Zeroes, deallocate) also passes the namespace's write gate, which a replicated
//! snapshot closes for a moment ([`crate::qos::QosState::hold_writes`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::backend::IoKind;
use crate::limits::{BACKEND_IO_BYTES_MAX, LBA_SHIFT, MAX_DATA_BYTES, MAX_DSM_RANGES};
use crate::ns::Namespace;
use crate::nvme::{io, Status, FABRICS};
use crate::qos::QosDir;
use crate::queue::{Outcome, Queue, Slot};

/// CDW12 bit: Force Unit Access.
const FUA: u32 = 1 << 30;
/// DSM CDW11 bit: deallocate.
const DSM_AD: u32 = 1 << 2;

impl Queue {
    /// Dispatches one I/O command held in slot `i`.
    pub fn exec_io(&mut self, i: usize) -> Outcome {
        let cmd = self.slots[i].cmd();
        let op = cmd.opcode();
        if op == FABRICS {
            return self.exec_fabrics(i);
        }
        if !matches!(
            op,
            io::READ | io::WRITE | io::FLUSH | io::WRITE_ZEROES | io::DSM
        ) {
            return Outcome::status(Status::INVALID_OPCODE);
        }
        let Some(ns) = self.visible_ns(cmd.nsid()).cloned() else {
            return Outcome::status(Status::INVALID_NS);
        };
        if !ns.spec.ana.optimized {
            // Another server serves it: a multipath host retries on that path.
            return Outcome::status(Status::ANA_INACCESSIBLE);
        }
        match op {
            io::READ | io::WRITE => self.read_write(i, ns, op == io::READ),
            io::FLUSH => self.submit_one(i, ns, IoKind::Flush, 0, 0),
            io::WRITE_ZEROES => self.write_zeroes(i, ns),
            _ => self.dsm(i, ns),
        }
    }

    /// Checks SLBA/NLB against the namespace; returns (byte offset, byte length).
    fn lba_range(&self, i: usize, ns: &Namespace) -> Result<(u64, u64), Status> {
        let cmd = self.slots[i].cmd();
        let slba = cmd.cdw10_11();
        let nlb = (cmd.cdw(12) & 0xffff) as u64 + 1;
        match slba.checked_add(nlb) {
            Some(end) if end <= ns.blocks => Ok((slba << LBA_SHIFT, nlb << LBA_SHIFT)),
            _ => Err(Status::LBA_RANGE),
        }
    }

    fn read_write(&mut self, i: usize, ns: Arc<Namespace>, read: bool) -> Outcome {
        let (off, len) = match self.lba_range(i, &ns) {
            Ok(r) => r,
            Err(s) => return Outcome::status(s),
        };
        if len as usize > MAX_DATA_BYTES {
            return Outcome::status(Status::INVALID_FIELD);
        }
        if len != self.slots[i].xfer as u64 {
            return Outcome::status(Status::SGL_LENGTH_INVALID);
        }
        let dir = if read { QosDir::Read } else { QosDir::Write };
        if !self.slots[i].tokens_paid {
            if !self.qos_admit(&ns, dir, len as u32) {
                return Outcome::Throttled;
            }
            self.slots[i].tokens_paid = true;
        }
        if !read && !self.admit_write(i, &ns) {
            return Outcome::Throttled;
        }
        // A read takes its buffer only now, after QoS: a throttled read holds no memory.
        if read && !self.has_data(i) && !self.take_or_wait_buf(i, len as usize) {
            return Outcome::AwaitBuf;
        }
        let kind = if read {
            self.slots[i].c2h_len = len as u32;
            IoKind::Read
        } else {
            IoKind::Write {
                fua: self.slots[i].cmd().cdw(12) & FUA != 0,
            }
        };
        // Parts of at most BACKEND_IO_BYTES_MAX: the command completes when all have.
        self.slots[i].ns = Some(ns);
        let mut done = 0u64;
        while done < len {
            let part = (len - done).min(BACKEND_IO_BYTES_MAX as u64);
            self.push_submit(i, kind, off + done, part as u32, done as u32);
            done += part;
        }
        self.settle(i)
    }

    /// Takes slot `i`'s write ticket (once): false while the namespace's write gate is
    /// closed (a replicated snapshot is being taken), and the command parks until it opens.
    fn admit_write(&mut self, i: usize, ns: &Namespace) -> bool {
        let s = &mut self.slots[i];
        if s.write_ticket.is_none() {
            s.write_ticket = ns.qos.admit_write();
        }
        s.write_ticket.is_some()
    }

    fn write_zeroes(&mut self, i: usize, ns: Arc<Namespace>) -> Outcome {
        match self.lba_range(i, &ns) {
            Ok(_) if !self.admit_write(i, &ns) => Outcome::Throttled,
            Ok((off, len)) => self.submit_one(i, ns, IoKind::WriteZeroes, off, len as u32),
            Err(s) => Outcome::status(s),
        }
    }

    fn dsm(&mut self, i: usize, ns: Arc<Namespace>) -> Outcome {
        let cmd = self.slots[i].cmd();
        let nr = (cmd.cdw(10) & 0xff) as usize + 1;
        if cmd.cdw(11) & DSM_AD == 0 {
            return Outcome::status(Status::SUCCESS); // hints only: nothing to do
        }
        if nr > MAX_DSM_RANGES || (self.slots[i].xfer as usize) < nr * 16 {
            return Outcome::status(Status::SGL_LENGTH_INVALID);
        }
        let mut ranges = [(0u64, 0u64); MAX_DSM_RANGES];
        let Some(data) = self.data(i, nr * 16) else {
            return Outcome::status(Status::INTERNAL);
        };
        for (r, d) in ranges.iter_mut().zip(data.chunks_exact(16)) {
            let nlb = u32::from_le_bytes([d[4], d[5], d[6], d[7]]) as u64;
            let mut slba = [0u8; 8];
            slba.copy_from_slice(&d[8..16]);
            let slba = u64::from_le_bytes(slba);
            match slba.checked_add(nlb) {
                Some(end) if end <= ns.blocks => *r = (slba << LBA_SHIFT, nlb << LBA_SHIFT),
                _ => return Outcome::status(Status::LBA_RANGE),
            }
        }
        if !self.admit_write(i, &ns) {
            return Outcome::Throttled;
        }
        self.slots[i].ns = Some(ns);
        for &(off, len) in ranges[..nr].iter().filter(|r| r.1 > 0) {
            // Ranges can exceed u32 bytes; split into chunks the request type can carry.
            let mut done = 0u64;
            while done < len {
                let chunk = (len - done).min(1 << 30);
                self.push_submit(i, IoKind::Deallocate, off + done, chunk as u32, 0);
                done += chunk;
            }
        }
        self.settle(i)
    }

    fn submit_one(
        &mut self,
        i: usize,
        ns: Arc<Namespace>,
        kind: IoKind,
        off: u64,
        len: u32,
    ) -> Outcome {
        self.slots[i].ns = Some(ns);
        self.push_submit(i, kind, off, len, 0);
        self.settle(i)
    }

    /// Adds a finished command to the SMART counters.
    pub fn account_stats(&self, i: usize) {
        let s = &self.slots[i];
        if !s.status.is_success() || self.qid == 0 {
            return;
        }
        let st = &self.ctrl.stats;
        match s.cmd().opcode() {
            io::READ => {
                st.read_cmds.fetch_add(1, Ordering::Relaxed);
                st.read_bytes.fetch_add(s.xfer as u64, Ordering::Relaxed);
            }
            io::WRITE => {
                st.write_cmds.fetch_add(1, Ordering::Relaxed);
                st.write_bytes.fetch_add(s.xfer as u64, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// Records one backend completion (`res`: bytes or -errno) against its slot.
pub fn account_completion(s: &mut Slot, res: i32) {
    s.parts = s.parts.saturating_sub(1);
    let op = s.cmd().opcode();
    let rw = matches!(op, io::READ | io::WRITE);
    if res > 0 {
        s.moved = s.moved.saturating_add(res as u32);
    }
    // A read or write may be in parts: it failed if one did, or if together they moved less
    // than the command asked for (a short transfer).
    let failed = res < 0 || (rw && s.parts == 0 && s.moved != s.xfer);
    if failed && s.status.is_success() {
        tracing::warn!(op, res, "storage operation failed");
        s.status = match op {
            _ if res == -libc::ENOSPC => Status::CAPACITY_EXCEEDED,
            _ if res == -libc::ENXIO || res == -libc::EAGAIN => Status::NS_NOT_READY,
            // A replica fenced this server's epoch: it is no longer the volume's primary.
            _ if res == crate::replica::FENCED => Status::ANA_INACCESSIBLE,
            io::READ => Status::READ_ERROR,
            io::WRITE => Status::WRITE_FAULT,
            _ => Status::INTERNAL,
        };
        s.c2h_len = 0;
    }
}
