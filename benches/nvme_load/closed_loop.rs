//! One I/O queue's closed loop for nvme_load: which blocks to touch, the write payload,
//! and keeping the initiator's queue at the job's depth while recording latencies.

use std::time::Instant;

use evstor_datapath::initiator::{flush_cmd, read_cmd, write_cmd, Data, Queue};
use evstor_datapath::limits::LBA_BYTES;

use crate::histogram::Histogram;
use crate::Job;

/// Which blocks a queue's commands touch, and whether they read or write.
pub struct Generator {
    rng: u64,
    next_lba: u64,
    first_lba: u64,
    span_blocks: u64,
    bs_blocks: u64,
    blocks: u64,
    read_pct: u32,
    random: bool,
}

impl Generator {
    /// Part `part` of `parts`: sequential queues stream through disjoint parts.
    pub fn new(job: &Job, blocks: u64, part: u64, parts: u64, seed: u64) -> Generator {
        let bs_blocks = job.bs as u64 / LBA_BYTES;
        let span = blocks / parts / bs_blocks * bs_blocks;
        Generator {
            rng: seed | 1,
            next_lba: span * part,
            first_lba: span * part,
            span_blocks: span.max(bs_blocks),
            bs_blocks,
            blocks,
            read_pct: job.read_pct,
            random: job.random,
        }
    }

    /// (is_write, slba) of the next command.
    fn next(&mut self) -> (bool, u64) {
        let write = match self.read_pct {
            100 => false,
            0 => true,
            p => (xorshift(&mut self.rng) % 100) as u32 >= p,
        };
        if self.random {
            let lba = xorshift(&mut self.rng) % (self.blocks / self.bs_blocks) * self.bs_blocks;
            return (write, lba);
        }
        let l = self.next_lba;
        self.next_lba += self.bs_blocks;
        if self.next_lba >= self.first_lba + self.span_blocks {
            self.next_lba = self.first_lba;
        }
        (write, l)
    }
}

/// xorshift64*: the next pseudo-random number from `state` (never zero).
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Write data: per 4 KiB block, 2 KiB of pseudo-random bytes then 2 KiB of a 256-byte
/// pattern. lz4 stores such a block in 5 of 8 sectors, and none is all zeroes.
fn payload(bytes: usize, seed: u64) -> Vec<u8> {
    let mut rng = seed | 1;
    let mut out = vec![0u8; bytes];
    for block in out.chunks_mut(LBA_BYTES as usize) {
        let (noise, pattern) = block.split_at_mut(block.len() / 2);
        for b in noise.iter_mut() {
            *b = (xorshift(&mut rng) >> 56) as u8;
        }
        for (i, b) in pattern.iter_mut().enumerate() {
            *b = (i * 31 + 7) as u8;
        }
    }
    out
}

/// The measured interval: completions outside it are not counted, none is issued after it.
#[derive(Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
}

pub struct QueueResult {
    pub hist: Histogram,
    pub bytes: u64,
    /// Commands completed with an error status.
    pub errors: u64,
}

/// Keeps `q` at the job's depth until the window ends (or `budget` commands were issued),
/// then drains it. A transport failure ends the loop with the error.
pub fn run_queue(
    q: &mut Queue,
    job: &Job,
    mut g: Generator,
    budget: u64,
    w: Window,
) -> anyhow::Result<QueueResult> {
    let data = payload(job.bs, g.rng);
    let blocks = (job.bs as u64 / LBA_BYTES) as u32;
    let mut issued = vec![Instant::now(); q.depth()];
    let mut res = QueueResult {
        hist: Histogram::new(),
        bytes: 0,
        errors: 0,
    };
    let mut count = 0u32;
    let mut issue = |q: &mut Queue, g: &mut Generator, issued: &mut [Instant]| {
        count = count.wrapping_add(1);
        let flush = job.flush_every > 0 && count.is_multiple_of(job.flush_every);
        let (write, slba) = g.next();
        let cid = if flush {
            q.submit(flush_cmd(1), Data::None)
        } else if write {
            q.submit(write_cmd(1, slba, blocks, job.fua), Data::ToTarget(&data))
        } else {
            q.submit(read_cmd(1, slba, blocks), Data::FromTarget(job.bs))
        }?;
        issued[cid as usize] = Instant::now();
        anyhow::Ok(())
    };
    let mut left = budget;
    while left > 0 && q.in_flight() < job.qd as usize {
        issue(q, &mut g, &mut issued)?;
        left -= 1;
    }
    while q.in_flight() > 0 {
        let c = q.reap()?;
        let now = Instant::now();
        if !c.status.is_success() {
            res.errors += 1;
        } else if now >= w.start && now < w.end {
            res.hist
                .record((now - issued[c.cid as usize]).as_nanos() as u64);
            res.bytes += job.bs as u64;
        }
        if now < w.end && left > 0 {
            issue(q, &mut g, &mut issued)?;
            left -= 1;
        }
    }
    Ok(res)
}
