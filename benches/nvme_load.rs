//! `nvme_load`: a closed-loop NVMe/TCP load generator on `evstor_datapath::initiator`'s
//! pipelined queues, per kind of volume, against the file-per-volume baseline; and a
//! `--scale` mode with many idle queues beside a few busy ones.
//!
//! Each volume kind gets a fresh target with a 1 GiB volume on tmpfs (the kinds and their
//! targets are in `nvme_load/target.rs`; `file`, `store`, `store-lz4`, `store-snap` run the
//! data path in this process, `plain`, `compressed`, `snapshotted` the release `evstor serve`).
//! The target runs on CPU 0 and the initiator on CPU 1. Every volume is written once,
//! sequentially in 128 KiB commands, before its first job, so reads hit allocated blocks.
//! Write data: each 4 KiB block is 2 KiB of pseudo-random bytes then 2 KiB of a 256-byte
//! pattern (lz4 stores it in 5 of 8 sectors; no block is all zeroes).
//!
//! Each job opens one session (admin queue + `--queues` I/O queues of depth `--qd`, one TCP
//! connection and one thread per queue) and keeps every queue full for `--secs`. It prints
//! IOPS, MiB/s, latency percentiles and the target's CPU seconds per million I/Os, then a
//! summary with each kind's median IOPS, and IOPS per second of target CPU, as multiples of
//! `file`'s (the goal is 0.8x).
//!
//! ```text
//! cargo bench --bench nvme_load                    # all kinds x {4k randread, randwrite} QD32
//! cargo bench --bench nvme_load -- --quick         # ~1 s per scenario (smoke)
//! cargo bench --bench nvme_load -- --kinds plain,file
//! cargo bench --bench nvme_load -- --rounds 3      # median of 3 passes (noisy machines)
//! cargo bench --bench nvme_load -- --full          # + QD1, 128k and 1M sequential jobs
//! cargo bench --bench nvme_load -- --digests       # header and data digests on
//! cargo bench --bench nvme_load -- --kinds plain --rw randread --bs 4096 --qd 32 --queues 2
//! cargo bench --bench nvme_load -- --scale         # 1000 queues connected, 100 busy at QD4
//! ```
//!
//! Nothing is allocated per I/O: the initiator's slots, the write payload and the latency
//! histogram are sized when a queue connects.

#[path = "nvme_load/closed_loop.rs"]
mod closed_loop;
#[path = "nvme_load/histogram.rs"]
mod histogram;
#[path = "nvme_load/report.rs"]
mod report;
#[path = "nvme_load/target.rs"]
mod target;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::ensure;
use clap::Parser;
use evstor_datapath::initiator::{Options, Queue, Session};
use evstor_datapath::limits::{INITIATOR_IO_QUEUES_MAX, INITIATOR_QUEUE_DEPTH_MAX, LBA_BYTES};

use closed_loop::{run_queue, Generator, Window};
use histogram::Histogram;
use report::Report;
use target::{Kind, Target, QUEUE_THREAD_PREFIX};

const HOST_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:6e766d65-6c6f-6164-0000-62656e636821";
/// Largest block size the bench issues (a slot buffer per command in flight).
const MAX_BS_BYTES: usize = 1 << 20;
/// Block size and depth of the sequential prefill.
const PREFILL_BS_BYTES: usize = 128 * 1024;
const PREFILL_QD: u16 = 16;
/// Most passes over the kinds one run makes.
const MAX_ROUNDS: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Pattern {
    Randread,
    Randwrite,
    Read,
    Write,
    Randrw,
    Rw,
}

/// Closed-loop NVMe/TCP load per volume kind (see the file's header and benches/RESULTS.md).
#[derive(Parser, Debug)]
#[command(name = "nvme_load")]
struct Args {
    /// About 1 s per job (smoke).
    #[arg(long)]
    quick: bool,
    /// Add QD1, 128k sequential QD32 and 1M sequential QD4 jobs.
    #[arg(long)]
    full: bool,
    /// Header and data digests on every queue.
    #[arg(long)]
    digests: bool,
    /// Seconds measured per job.
    #[arg(long, env = "NVME_LOAD_SECS", default_value_t = 6.0)]
    secs: f64,
    /// Seconds of load before the measured window (default: a tenth of --secs, at most 1).
    #[arg(long)]
    warmup: Option<f64>,
    /// I/O queues per job.
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=INITIATOR_IO_QUEUES_MAX as i64))]
    queues: u16,
    /// Volume kinds, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    kinds: Vec<Kind>,
    /// Passes over all kinds (odd ones backwards); the summary takes medians.
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=MAX_ROUNDS as i64))]
    rounds: u16,
    /// One custom job of this pattern (with --bs, --qd, --rwmixread).
    #[arg(long, value_enum)]
    rw: Option<Pattern>,
    /// Percentage of reads for randrw/rw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    rwmixread: u32,
    /// The custom job's writes carry Force Unit Access (each is durable when it completes).
    #[arg(long)]
    fua: bool,
    /// In the custom job, every this many commands of a queue is a Flush.
    #[arg(long, default_value_t = 0)]
    flush_every: u32,
    /// Block size in bytes of the custom job (a multiple of 4096, at most 1 MiB).
    #[arg(long)]
    bs: Option<usize>,
    /// Queue depth of the custom job.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=INITIATOR_QUEUE_DEPTH_MAX as i64))]
    qd: Option<u16>,
    /// The `evstor` binary the served kinds run.
    #[arg(long, default_value = env!("CARGO_BIN_EXE_evstor"))]
    bin: PathBuf,
    /// Instead of the kinds: --scale-queues I/O queues connected, --scale-active of them
    /// busy with 4k random reads at --scale-qd, against a child target process.
    #[arg(long)]
    scale: bool,
    /// I/O queues --scale connects (in controllers of 16).
    #[arg(long, default_value_t = 1000)]
    scale_queues: usize,
    /// Of those, how many --scale keeps busy (spread evenly), one thread each.
    #[arg(long, default_value_t = 100)]
    scale_active: usize,
    /// Queue depth of each busy --scale queue.
    #[arg(long, default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=INITIATOR_QUEUE_DEPTH_MAX as i64))]
    scale_qd: u16,
    /// Passed by `cargo bench` to `harness = false` targets; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Internal: run as the `--scale` target process.
    #[arg(long, hide = true)]
    scale_target_child: bool,
}

#[derive(Debug, Clone, Copy)]
struct Job {
    /// Block size in bytes.
    bs: usize,
    /// Commands in flight per queue.
    qd: u16,
    /// Percentage of reads (0..=100).
    read_pct: u32,
    random: bool,
    queues: u16,
    /// Writes with Force Unit Access.
    fua: bool,
    /// Every this many commands of a queue, a Flush (0: none).
    flush_every: u32,
}

impl Job {
    fn name(&self) -> String {
        let kind = match (self.read_pct, self.random) {
            (100, true) => "randread".to_string(),
            (0, true) => "randwrite".to_string(),
            (100, false) => "seqread".to_string(),
            (0, false) => "seqwrite".to_string(),
            (p, r) => format!("{}rw{p}", if r { "rand" } else { "seq" }),
        };
        let fua = if self.fua { " fua" } else { "" };
        let flush = match self.flush_every {
            0 => String::new(),
            n => format!(" flush/{n}"),
        };
        format!(
            "{}k {kind}{fua}{flush} qd{} x{}q",
            self.bs / 1024,
            self.qd,
            self.queues
        )
    }

    fn options(&self, digests: bool) -> Options {
        let o = Options {
            io_queues: self.queues,
            queue_depth: self.qd,
            slot_bytes: self.bs,
            ..Options::default()
        };
        if digests {
            o.with_digests()
        } else {
            o
        }
    }
}

fn job(bs: usize, qd: u16, read_pct: u32, random: bool, queues: u16) -> Job {
    Job {
        bs,
        qd,
        read_pct,
        random,
        queues,
        fua: false,
        flush_every: 0,
    }
}

/// The jobs the arguments ask for.
fn jobs(a: &Args) -> anyhow::Result<Vec<Job>> {
    let q = a.queues;
    if a.rw.is_some() || a.bs.is_some() || a.qd.is_some() || a.fua || a.flush_every > 0 {
        let (read_pct, random) = match a.rw.unwrap_or(Pattern::Randread) {
            Pattern::Randread => (100, true),
            Pattern::Randwrite => (0, true),
            Pattern::Read => (100, false),
            Pattern::Write => (0, false),
            Pattern::Randrw => (a.rwmixread, true),
            Pattern::Rw => (a.rwmixread, false),
        };
        let bs = a.bs.unwrap_or(4096);
        ensure!(
            (4096..=MAX_BS_BYTES).contains(&bs) && bs.is_multiple_of(4096),
            "--bs must be a multiple of 4096 up to {MAX_BS_BYTES}"
        );
        return Ok(vec![Job {
            fua: a.fua,
            flush_every: a.flush_every,
            ..job(bs, a.qd.unwrap_or(1), read_pct, random, q)
        }]);
    }
    let mut v = vec![job(4096, 32, 100, true, q), job(4096, 32, 0, true, q)];
    if a.full {
        v.insert(0, job(4096, 1, 100, true, q));
        v.insert(2, job(4096, 1, 0, true, q));
        v.extend([
            job(128 * 1024, 32, 100, false, q),
            job(128 * 1024, 32, 0, false, q),
            job(1 << 20, 4, 100, false, q),
            job(1 << 20, 4, 0, false, q),
        ]);
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Jobs per kind.

fn connect(addr: SocketAddr, subnqn: &str, opts: &Options) -> anyhow::Result<(Session, u64)> {
    let mut s = Session::connect_with(addr, subnqn, HOST_NQN, opts)?;
    let nsid = *s.active_namespaces()?.first().unwrap_or(&0);
    ensure!(
        nsid == 1,
        "the bench expects namespace 1, the target shows {nsid}"
    );
    let info = s.namespace(1)?;
    ensure!(
        info.block_bytes as u64 == LBA_BYTES,
        "bench assumes 4 KiB blocks"
    );
    Ok((s, info.blocks))
}

/// Writes the whole namespace once, sequentially in 128 KiB commands, so reads hit
/// allocated blocks, not holes.
fn precondition(addr: SocketAddr, subnqn: &str, digests: bool) -> anyhow::Result<()> {
    let j = job(PREFILL_BS_BYTES, PREFILL_QD, 0, false, 1);
    let (mut s, blocks) = connect(addr, subnqn, &j.options(digests))?;
    let g = Generator::new(&j, blocks, 0, 1, 1);
    let far = Instant::now() + Duration::from_secs(3600);
    let w = Window {
        start: far,
        end: far,
    };
    let r = run_queue(
        &mut s.io_queues()[0],
        &j,
        g,
        blocks / (PREFILL_BS_BYTES as u64 / LBA_BYTES),
        w,
    )?;
    ensure!(r.errors == 0, "{} prefill writes failed", r.errors);
    Ok(())
}

/// One job: a session with the job's queues, one thread each, all started together.
fn run_job(target: &Target, a: &Args, kind: Kind, j: Job) -> anyhow::Result<Report> {
    let (mut s, blocks) = connect(target.nvme(), target.subnqn(), &j.options(a.digests))?;
    let warmup = a.warmup.unwrap_or((a.secs / 10.0).min(1.0));
    let start = Instant::now() + Duration::from_secs_f64(warmup + 0.2);
    let w = Window {
        start,
        end: start + Duration::from_secs_f64(a.secs),
    };
    // Queue threads outlive the last CPU sample: an exited thread no longer shows in
    // /proc/self/task, from which the initiator's CPU time is summed.
    let sampled = Barrier::new(j.queues as usize + 1);
    let (cpu, results) = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for (n, q) in s.io_queues().iter_mut().enumerate() {
            let g = Generator::new(
                &j,
                blocks,
                n as u64,
                j.queues as u64,
                0x9e37_79b9 ^ ((n as u64 + 1) << 32),
            );
            let sampled = &sampled;
            let t = std::thread::Builder::new().name(format!("{QUEUE_THREAD_PREFIX}{}", n + 1));
            handles.push(t.spawn_scoped(scope, move || {
                let r = run_queue(q, &j, g, u64::MAX, w);
                sampled.wait();
                r
            }));
        }
        let cpu = sample_cpu(target, w);
        sampled.wait();
        let results: Vec<_> = handles.into_iter().map(|h| h.map(|h| h.join())).collect();
        (cpu, results)
    });
    let ((t0, h0), (t1, h1)) = cpu?;
    let mut hist = Histogram::new();
    let mut bytes = 0;
    for r in results {
        let r = r?.map_err(|_| anyhow::anyhow!("queue thread panicked"))??;
        ensure!(r.errors == 0, "{} I/O errors", r.errors);
        hist.merge(&r.hist);
        bytes += r.bytes;
    }
    Ok(Report {
        kind,
        name: j.name(),
        iops: hist.total as f64 / a.secs,
        mib_s: bytes as f64 / a.secs / (1 << 20) as f64,
        hist,
        target_cpu_s: t1 - t0,
        host_cpu_s: h1 - h0,
        secs: a.secs,
    })
}

/// CPU seconds (target, initiator) at the window's start and end.
fn sample_cpu(target: &Target, w: Window) -> anyhow::Result<((f64, f64), (f64, f64))> {
    if pinned() {
        target.repin()?;
    }
    std::thread::sleep(w.start.saturating_duration_since(Instant::now()));
    let first = target.cpu_secs()?;
    std::thread::sleep(w.end.saturating_duration_since(Instant::now()));
    Ok((first, target.cpu_secs()?))
}

/// Target on CPU 0, initiator on CPU 1 (needs 2 CPUs).
fn pinned() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2)
}

/// One kind: a fresh target and volume, the prefill (and snapshot), then every job.
fn run_kind(kind: Kind, a: &Args, jobs: &[Job]) -> anyhow::Result<Vec<Report>> {
    let target = Target::start(kind, &a.bin, pinned())?;
    if pinned() {
        target::pin(0, 1)?;
    }
    let t = Instant::now();
    precondition(target.nvme(), target.subnqn(), a.digests)?;
    let mut note = format!(
        "{}: 1 GiB prefilled in {:.1} s",
        kind.name(),
        t.elapsed().as_secs_f64()
    );
    if let Some(r) = target.compression_ratio()? {
        note += &format!(", stored ratio {r:.2}");
    }
    if kind.snapshot() {
        let t = Instant::now();
        target.snapshot()?;
        note += &format!(", snapshot in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    println!("{note}");
    let mut reports = Vec::new();
    for &j in jobs {
        let r = run_job(&target, a, kind, j)?;
        report::print_report(&r);
        reports.push(r);
    }
    Ok(reports)
}

// ---------------------------------------------------------------------------------------------
// --scale: many connected queues, a few busy.

fn run_scale(a: &Args) -> anyhow::Result<()> {
    ensure!(
        a.scale_active <= a.scale_queues,
        "--scale-active exceeds --scale-queues"
    );
    let child = target::ChildTarget::spawn()?;
    let (addr, nqn) = (child.nvme, target::IN_PROCESS_NQN);
    if pinned() {
        target::pin(child.pid(), 0)?;
        target::pin(0, 1)?;
    }
    precondition(addr, nqn, a.digests)?;
    let (rss0, _) = target::rss_kib(child.pid())?;
    let j = job(4096, a.scale_qd, 100, true, INITIATOR_IO_QUEUES_MAX);
    let t = Instant::now();
    let (mut sessions, blocks) = connect_many(addr, nqn, a, j)?;
    let connect_s = t.elapsed().as_secs_f64();
    let (idle_rss, _) = target::rss_kib(child.pid())?;
    let mut queues: Vec<&mut Queue> = sessions
        .iter_mut()
        .flat_map(|s| s.io_queues().iter_mut())
        .collect();
    let connected = queues.len();
    let (hist, errors, failed) = drive_some(&mut queues, a, j, blocks)?;
    let (rss, hwm) = target::rss_kib(child.pid())?;
    report::print_scale(&report::Scale {
        connected,
        sessions: sessions.len(),
        active: a.scale_active,
        qd: a.scale_qd,
        secs: a.secs,
        connect_s,
        hist: &hist,
        errors,
        failed,
        rss_kib: [rss0, idle_rss, rss, hwm],
    });
    Ok(())
}

/// Sessions of up to 16 I/O queues each until `--scale-queues` are connected; and the
/// namespace's size in blocks.
fn connect_many(
    addr: SocketAddr,
    nqn: &str,
    a: &Args,
    j: Job,
) -> anyhow::Result<(Vec<Session>, u64)> {
    let mut sessions = Vec::new();
    let mut blocks = 0;
    for first in (0..a.scale_queues).step_by(INITIATOR_IO_QUEUES_MAX as usize) {
        let n = (a.scale_queues - first).min(INITIATOR_IO_QUEUES_MAX as usize) as u16;
        let (s, b) = connect(addr, nqn, &Job { queues: n, ..j }.options(a.digests))?;
        sessions.push(s);
        blocks = b;
    }
    Ok((sessions, blocks))
}

/// Runs `--scale-active` of `queues`, spread evenly over them, one thread each, for
/// `--secs`; the others stay idle. Returns the latencies, the commands that failed with
/// a status and the queues that failed with a transport error.
fn drive_some(
    queues: &mut [&mut Queue],
    a: &Args,
    j: Job,
    blocks: u64,
) -> anyhow::Result<(Histogram, u64, usize)> {
    let stride = (queues.len() / a.scale_active.max(1)).max(1);
    let start = Instant::now() + Duration::from_millis(500);
    let w = Window {
        start,
        end: start + Duration::from_secs_f64(a.secs),
    };
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = queues
            .iter_mut()
            .step_by(stride)
            .take(a.scale_active)
            .enumerate()
            .map(|(n, q)| {
                let g = Generator::new(&j, blocks, 0, 1, 0x5ca1e ^ ((n as u64 + 1) << 32));
                scope.spawn(move || run_queue(q, &j, g, u64::MAX, w))
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut hist = Histogram::new();
    let (mut errors, mut failed) = (0, 0);
    for r in results {
        match r.map_err(|_| anyhow::anyhow!("queue thread panicked"))? {
            Ok(r) => {
                hist.merge(&r.hist);
                errors += r.errors;
            }
            Err(e) => {
                failed += 1;
                eprintln!("queue failed: {e:#}");
            }
        }
    }
    Ok((hist, errors, failed))
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.scale_target_child {
        return target::serve_child();
    }
    let a = Args {
        secs: if a.quick { 1.0 } else { a.secs },
        ..a
    };
    if a.scale {
        return run_scale(&a);
    }
    let jobs = jobs(&a)?;
    let kinds = if a.kinds.is_empty() {
        Kind::ALL.to_vec()
    } else {
        a.kinds.clone()
    };
    let all_cpus = target::affinity()?;
    let warmup = a.warmup.unwrap_or((a.secs / 10.0).min(1.0));
    report::print_header(a.secs, warmup, a.digests, pinned());
    let mut reports = Vec::new();
    for round in 0..a.rounds {
        // Odd rounds go backwards, so drift in the background load favours no kind.
        let mut order = kinds.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for &kind in &order {
            // Start-up (server, RocksDB) may use every CPU; run_kind pins once it is done.
            target::set_affinity(0, &all_cpus)?;
            reports.extend(run_kind(kind, &a, &jobs)?);
        }
    }
    report::print_summary(&reports, a.rounds as usize);
    Ok(())
}
