//! `nvme_load`: a closed-loop NVMe/TCP load generator, per kind of volume, against the
//! file-per-volume baseline.
//!
//! Each volume kind gets a fresh target with a 1 GiB volume whose storage is on tmpfs:
//!
//! | kind | target | volume |
//! |---|---|---|
//! | `file` | in this process | `Backing::File`: the pre-block-store file per volume (baseline) |
//! | `store` | in this process | `Backing::Image` in a `BlockStore`, no compression |
//! | `store-lz4` | in this process | as `store`, lz4 on |
//! | `store-snap` | in this process | as `store`, snapshotted after the prefill |
//! | `plain` | release `evstor serve` | volume created over the REST API |
//! | `compressed` | release `evstor serve` | created with `"compression": "true"` |
//! | `snapshotted` | release `evstor serve` | snapshot `s1` taken over the API after the prefill |
//!
//! The in-process kinds isolate the data path (same target code, only the backend differs);
//! the `evstor serve` kinds are the product as shipped. The target runs on CPU 0 (the server
//! process, or the in-process target's threads, which inherit it from the thread that started
//! them) and the initiator on CPU 1. Every volume is written once, sequentially in 128 KiB
//! commands, before its first job, so reads hit allocated blocks rather than holes (a thin
//! volume answers a never-written block with zeroes without touching the device).
//!
//! Write data, for every kind: each 4 KiB block is 2 KiB of pseudo-random bytes then 2 KiB of
//! a 256-byte repeating pattern, so lz4 stores it in 5 of 8 sectors (ratio 1.6) and no block
//! is all zeroes (the block store keeps those as holes).
//!
//! The initiator is built on the crate's PDU codec: ICReq, Fabrics Connect (admin + one TCP
//! connection and one thread per I/O queue), Identify, then I/O at a fixed queue depth. It
//! prints IOPS, MiB/s, latency percentiles and the target's CPU seconds per million I/Os, then
//! a summary with each kind's median IOPS, and IOPS per second of target CPU, as multiples of
//! `file`'s (the goal is 0.8x).
//!
//! ```text
//! cargo bench --bench nvme_load                    # all kinds x {4k randread, randwrite} QD32
//! cargo bench --bench nvme_load -- --quick         # ~1 s per scenario (smoke)
//! cargo bench --bench nvme_load -- --kinds plain,file
//! cargo bench --bench nvme_load -- --rounds 3      # median of 3 passes (noisy machines)
//! cargo bench --bench nvme_load -- --full          # + QD1 and 128k sequential jobs
//! cargo bench --bench nvme_load -- --digests       # header and data digests on
//! cargo bench --bench nvme_load -- --kinds plain --rw randread --bs 4096 --qd 32 --queues 2
//! ```
//!
//! The initiator allocates nothing per I/O: receive and send buffers, command slots
//! and the latency histogram are sized when a queue connects.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use evstor_datapath::blockstore::{BlockStore, DeviceSpec};
use evstor_datapath::limits::MAX_HDR_BYTES;
use evstor_datapath::pdu::{
    self, Check, DataHdr, HdrFields, IcReq, Pdu, PduType, RxContext, TxContext, FLAG_LAST_PDU,
    IC_DDGST_ENABLE, IC_HDGST_ENABLE,
};
use evstor_datapath::{Acl, Backing, NamespaceSpec, QosLimits, TargetConfig, TargetHandle};
use serde_json::{json, Value};
use uuid::Uuid;

const HOST_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:6e766d65-6c6f-6164-0000-62656e636821";
/// Subsystem NQN of the in-process target.
const IN_PROCESS_NQN: &str = "nqn.2024-01.io.evstor:nvme-load";
/// Size of the volume under test, for every kind.
const VOLUME_BYTES: u64 = 1 << 30;
/// Pool device of the in-process block store (a sparse tmpfs file): room for the prefill
/// and the overwrites whose space is reclaimed only after a metadata sync.
const STORE_DEVICE_BYTES: u64 = 4 << 30;
/// Receive buffer per connection: many responses plus a maximal data PDU.
const RX_BUF_BYTES: usize = 4 << 20;
/// Largest data PDU the initiator accepts.
const MAX_RX_DATA_BYTES: u32 = 1 << 20;
/// Largest block size the bench issues (the target's MDTS is 8 MiB; the bench's receive
/// side takes data PDUs of up to 1 MiB).
const MAX_BS_BYTES: usize = 1 << 20;
/// Block size of the sequential prefill.
const PREFILL_BS_BYTES: usize = 128 * 1024;
/// Deepest queue the bench asks for (the target's MAX_QUEUE_DEPTH is 128, SQSIZE is 0-based).
const MAX_QD: usize = 127;
const LBA_BYTES: u64 = 4096;
/// Connect refused because the queue ID is in use (SCT 1, SC 1).
const STATUS_INVALID_QID: u16 = 0x101;
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Name prefix of the initiator's queue threads (CPU accounting tells them from the target's).
const QUEUE_THREAD_PREFIX: &str = "nvme-load-q";
/// Most passes over the kinds one run makes.
const MAX_ROUNDS: usize = 20;
/// The goal: every kind reaches this multiple of the file baseline's IOPS.
const GOAL_RATIO: f64 = 0.8;

// ---------------------------------------------------------------------------------------------
// Options and scenarios

#[derive(Debug, Clone, Copy)]
struct Job {
    /// Block size in bytes.
    bs: usize,
    /// Outstanding commands per queue.
    qd: usize,
    /// Percentage of reads (0..=100).
    read_pct: u32,
    random: bool,
    queues: usize,
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
        let bs = if self.bs.is_multiple_of(1024) {
            format!("{}k", self.bs / 1024)
        } else {
            format!("{}", self.bs)
        };
        format!("{bs} {kind} qd{} x{}q", self.qd, self.queues)
    }
}

/// What backs the volume under test, and who serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Store,
    StoreLz4,
    StoreSnap,
    Plain,
    Compressed,
    Snapshotted,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::File,
        Kind::Store,
        Kind::StoreLz4,
        Kind::StoreSnap,
        Kind::Plain,
        Kind::Compressed,
        Kind::Snapshotted,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Store => "store",
            Kind::StoreLz4 => "store-lz4",
            Kind::StoreSnap => "store-snap",
            Kind::Plain => "plain",
            Kind::Compressed => "compressed",
            Kind::Snapshotted => "snapshotted",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Served by `evstor serve` rather than by a target in this process.
    fn served(self) -> bool {
        matches!(self, Kind::Plain | Kind::Compressed | Kind::Snapshotted)
    }

    fn compress(self) -> bool {
        matches!(self, Kind::StoreLz4 | Kind::Compressed)
    }

    fn snapshot(self) -> bool {
        matches!(self, Kind::StoreSnap | Kind::Snapshotted)
    }
}

struct Opts {
    secs: f64,
    warmup_secs: f64,
    digests: bool,
    jobs: Vec<Job>,
    kinds: Vec<Kind>,
    /// Passes over all kinds (the summary takes the median).
    rounds: usize,
    bin: PathBuf,
    /// Target on CPU 0, initiator on CPU 1 (needs 2 CPUs).
    pinned: bool,
}

fn default_suite(queues: usize) -> Vec<Job> {
    vec![
        job(4096, 32, 100, true, queues),
        job(4096, 32, 0, true, queues),
    ]
}

fn full_suite(queues: usize) -> Vec<Job> {
    vec![
        job(4096, 1, 100, true, queues),
        job(4096, 32, 100, true, queues),
        job(4096, 1, 0, true, queues),
        job(4096, 32, 0, true, queues),
        job(128 * 1024, 32, 100, false, queues),
        job(128 * 1024, 32, 0, false, queues),
        job(1 << 20, 4, 100, false, queues),
        job(1 << 20, 4, 0, false, queues),
    ]
}

fn job(bs: usize, qd: usize, read_pct: u32, random: bool, queues: usize) -> Job {
    Job {
        bs,
        qd,
        read_pct,
        random,
        queues,
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: nvme_load [--quick] [--full] [--digests] [--secs S] [--warmup S] [--queues N]\n\
         \x20                [--kinds all|K,K,...] [--rounds N] [--bin PATH]\n\
         \x20                [--rw randread|randwrite|read|write|randrw|rw] [--rwmixread PCT]\n\
         \x20                [--bs BYTES] [--qd N]\n\
         kinds: file store store-lz4 store-snap (in-process target), plain compressed\n\
         snapshotted (evstor serve); default all. Jobs: 4k randread and randwrite QD32;\n\
         --full adds QD1, 128k sequential QD32 and 1M sequential QD4; any of --rw/--bs/--qd runs one custom job.\n\
         --rounds N repeats all kinds N times (odd rounds backwards); the summary takes medians.\n\
         NVME_LOAD_SECS sets the default duration."
    );
    std::process::exit(2)
}

fn parse_kinds(list: &str) -> Vec<Kind> {
    if list == "all" {
        return Kind::ALL.to_vec();
    }
    list.split(',')
        .map(|k| Kind::parse(k.trim()).unwrap_or_else(|| usage()))
        .collect()
}

fn parse_opts() -> anyhow::Result<Opts> {
    let mut secs: f64 = std::env::var("NVME_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6.0);
    let mut warmup = None;
    let (mut digests, mut quick, mut full, mut queues) = (false, false, false, 1usize);
    let (mut rw, mut bs, mut qd, mut mix) = (None::<String>, None::<usize>, None::<usize>, 50u32);
    let mut kinds = Kind::ALL.to_vec();
    let mut rounds = 1usize;
    let mut bin = PathBuf::from(env!("CARGO_BIN_EXE_evstor"));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--quick" => quick = true,
            "--full" => full = true,
            "--digests" => digests = true,
            "--bench" => {} // cargo bench passes this to harness = false targets
            "--secs" => secs = val().parse()?,
            "--warmup" => warmup = Some(val().parse()?),
            "--queues" => queues = val().parse()?,
            "--kinds" => kinds = parse_kinds(&val()),
            "--rounds" => rounds = val().parse()?,
            "--rw" => rw = Some(val()),
            "--rwmixread" => mix = val().parse()?,
            "--bs" => bs = Some(val().parse()?),
            "--qd" => qd = Some(val().parse()?),
            "--bin" => bin = PathBuf::from(val()),
            _ => usage(),
        }
    }
    if quick {
        secs = 1.0;
    }
    let warmup_secs = warmup.unwrap_or((secs / 10.0).min(1.0));
    ensure!((1..=16).contains(&queues), "--queues must be 1..=16");
    ensure!(!kinds.is_empty(), "--kinds names no kind");
    ensure!(
        (1..=MAX_ROUNDS).contains(&rounds),
        "--rounds must be 1..={MAX_ROUNDS}"
    );
    let jobs = if rw.is_some() || bs.is_some() || qd.is_some() {
        let (read_pct, random) = match rw.as_deref().unwrap_or("randread") {
            "randread" => (100, true),
            "randwrite" => (0, true),
            "read" => (100, false),
            "write" => (0, false),
            "randrw" => (mix.min(100), true),
            "rw" => (mix.min(100), false),
            _ => usage(),
        };
        let (bs, qd) = (bs.unwrap_or(4096), qd.unwrap_or(1));
        vec![job(bs, qd, read_pct, random, queues)]
    } else if full {
        full_suite(queues)
    } else {
        default_suite(queues)
    };
    for j in &jobs {
        ensure!(
            j.bs >= 4096 && j.bs <= MAX_BS_BYTES && j.bs % 4096 == 0,
            "--bs must be a multiple of 4096 up to {MAX_BS_BYTES}"
        );
        ensure!((1..=MAX_QD).contains(&j.qd), "--qd must be 1..={MAX_QD}");
    }
    Ok(Opts {
        secs,
        warmup_secs,
        digests,
        jobs,
        kinds,
        rounds,
        bin,
        pinned: std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2),
    })
}

// ---------------------------------------------------------------------------------------------
// Latency histogram: log2 buckets, each split into SUB linear sub-buckets (~1.6% error).

const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = 40 * SUB;

struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum_ns: u128,
    max_ns: u64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }

    fn index(ns: u64) -> usize {
        if ns < SUB as u64 {
            return ns as usize;
        }
        let msb = 63 - ns.leading_zeros();
        let shift = msb - SUB_BITS;
        let sub = (ns >> shift) as usize - SUB;
        (((shift + 1) as usize * SUB) + sub).min(BUCKETS - 1)
    }

    /// The largest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        if i < SUB {
            return i as u64;
        }
        let shift = (i / SUB - 1) as u32;
        let sub = (i % SUB) as u64 + SUB as u64;
        ((sub + 1) << shift) - 1
    }

    fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum_ns += ns as u128;
        self.max_ns = self.max_ns.max(ns);
    }

    fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.sum_ns += o.sum_ns;
        self.max_ns = self.max_ns.max(o.max_ns);
    }

    fn percentile_ns(&self, p: f64) -> u64 {
        let want = ((self.total as f64) * p / 100.0).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Self::upper(i).min(self.max_ns);
            }
        }
        self.max_ns
    }

    fn mean_ns(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.total as f64
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The wire: a PDU-level connection with fixed buffers.

struct Rx {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    ctx: RxContext,
}

impl Rx {
    /// Reads what the socket has (blocking until something arrives).
    fn fill(&mut self, mut sock: &TcpStream) -> anyhow::Result<()> {
        if self.start > 0 && self.buf.len() - self.end < MAX_RX_DATA_BYTES as usize + 4096 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = sock.read(&mut self.buf[self.end..])?;
        ensure!(n > 0, "target closed the connection");
        self.end += n;
        Ok(())
    }

    /// The next complete PDU, if buffered.
    fn next(&mut self) -> anyhow::Result<Option<Pdu<'_>>> {
        let avail = &self.buf[self.start..self.end];
        let plen = match pdu::check(avail, &self.ctx)? {
            Check::Complete(n) if avail.len() >= n => n,
            _ => return Ok(None),
        };
        let at = self.start;
        self.start += plen;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(pdu::parse(&self.buf[at..at + plen], &self.ctx)?))
    }
}

struct Tx {
    buf: Vec<u8>,
    ctx: TxContext,
    hdr: [u8; MAX_HDR_BYTES],
}

impl Tx {
    /// Appends one PDU (header, data, data digest) to the send buffer.
    fn push(&mut self, t: PduType, flags: u8, fields: &HdrFields<'_>, data: &[u8]) {
        let n = pdu::encode_header(&mut self.hdr, &self.ctx, t, flags, fields, data.len());
        self.buf.extend_from_slice(&self.hdr[..n]);
        self.buf.extend_from_slice(data);
        if self.ctx.ddgst && !data.is_empty() {
            self.buf.extend_from_slice(&pdu::data_digest(data));
        }
    }

    fn flush(&mut self, mut sock: &TcpStream) -> anyhow::Result<()> {
        if !self.buf.is_empty() {
            sock.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

struct Wire {
    sock: TcpStream,
    rx: Rx,
    tx: Tx,
    maxh2c: u32,
}

/// A completion as the initiator sees it.
struct Cqe {
    cid: u16,
    status: u16,
    dw0: u64,
}

fn cqe_of(c: &[u8; 16]) -> Cqe {
    Cqe {
        dw0: u64::from_le_bytes(c[0..8].try_into().expect("8-byte slice")),
        cid: u16::from_le_bytes([c[12], c[13]]),
        status: (u16::from_le_bytes([c[14], c[15]]) >> 1) & 0x7ff,
    }
}

impl Wire {
    /// TCP connect and ICReq/ICResp.
    fn connect(addr: SocketAddr, digests: bool, tx_cap: usize) -> anyhow::Result<Wire> {
        let sock = TcpStream::connect(addr)?;
        sock.set_nodelay(true)?;
        let digest = if digests {
            IC_HDGST_ENABLE | IC_DDGST_ENABLE
        } else {
            0
        };
        let mut w = Wire {
            sock,
            rx: Rx {
                buf: vec![0; RX_BUF_BYTES],
                start: 0,
                end: 0,
                ctx: RxContext {
                    from_controller: true,
                    hdgst: false,
                    ddgst: false,
                    data_align: 4,
                    max_data: MAX_RX_DATA_BYTES,
                },
            },
            tx: Tx {
                buf: Vec::with_capacity(tx_cap),
                ctx: TxContext::plain(),
                hdr: [0; MAX_HDR_BYTES],
            },
            maxh2c: 0,
        };
        let req = IcReq {
            pfv: 0,
            hpda: 0,
            digest,
            maxr2t: 0,
        };
        w.tx.push(PduType::IcReq, 0, &HdrFields::IcReq(req), &[]);
        w.tx.flush(&w.sock)?;
        let resp = loop {
            if let Some(p) = w.rx.next()? {
                match p {
                    Pdu::IcResp(r) => break r,
                    other => bail!("expected ICResp, got {other:?}"),
                }
            }
            w.rx.fill(&w.sock)?;
        };
        ensure!(resp.digest == digest, "target refused digests {digest:#x}");
        w.maxh2c = resp.maxh2cdata;
        w.rx.ctx.hdgst = digests;
        w.rx.ctx.ddgst = digests;
        w.tx.ctx = TxContext {
            hdgst: digests,
            ddgst: digests,
            data_align: (resp.cpda as usize + 1) * 4,
        };
        Ok(w)
    }

    /// Runs one command synchronously (setup path); C2H data lands in `out`.
    fn exec(&mut self, mut sqe: Sqe, h2c: &[u8], out: &mut [u8]) -> anyhow::Result<Cqe> {
        sqe.sgl(0, (h2c.len() + out.len()) as u32, !h2c.is_empty());
        let cid = sqe.cid();
        self.tx
            .push(PduType::CapsuleCmd, 0, &HdrFields::Cmd(&sqe.0), h2c);
        self.tx.flush(&self.sock)?;
        loop {
            while let Some(p) = self.rx.next()? {
                match p {
                    Pdu::CapsuleResp { cqe } => {
                        let c = cqe_of(cqe);
                        ensure!(c.cid == cid, "response for cid {} not {cid}", c.cid);
                        return Ok(c);
                    }
                    Pdu::C2hData { hdr, data, .. } => {
                        let o = hdr.offset as usize;
                        out[o..o + data.len()].copy_from_slice(data);
                    }
                    other => bail!("unexpected PDU {other:?}"),
                }
            }
            self.rx.fill(&self.sock)?;
        }
    }
}

/// A submission queue entry under construction.
#[derive(Clone, Copy)]
struct Sqe([u8; 64]);

impl Sqe {
    fn new(opcode: u8, cid: u16, nsid: u32) -> Sqe {
        let mut s = [0u8; 64];
        s[0] = opcode;
        s[1] = 0x40; // PSDT: SGL
        s[2..4].copy_from_slice(&cid.to_le_bytes());
        s[4..8].copy_from_slice(&nsid.to_le_bytes());
        Sqe(s)
    }
    fn cid(&self) -> u16 {
        u16::from_le_bytes([self.0[2], self.0[3]])
    }
    fn set32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn set64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    /// The data SGL: in-capsule (offset) or transport data block (R2T / C2HData).
    fn sgl(&mut self, addr: u64, len: u32, in_capsule: bool) {
        self.set64(24, addr);
        self.set32(32, len);
        self.0[39] = if in_capsule { 0x01 } else { 0x5a };
    }
}

fn connect_cmd(
    wire: &mut Wire,
    subnqn: &str,
    cntlid: u16,
    qid: u16,
    qd: usize,
) -> anyhow::Result<Cqe> {
    let mut c = Sqe::new(0x7f, 0, 0);
    c.0[4] = 0x01; // FCTYPE Connect
    c.0[42..44].copy_from_slice(&qid.to_le_bytes());
    c.0[44..46].copy_from_slice(&(qd as u16).to_le_bytes()); // SQSIZE (0-based) = qd: one spare
    let mut data = [0u8; 1024];
    data[0..16].copy_from_slice(b"nvme-load-bench!");
    data[16..18].copy_from_slice(&cntlid.to_le_bytes());
    data[256..256 + subnqn.len()].copy_from_slice(subnqn.as_bytes());
    data[512..512 + HOST_NQN.len()].copy_from_slice(HOST_NQN.as_bytes());
    wire.exec(c, &data, &mut [])
}

/// What the admin queue learned.
struct Controller {
    _admin: Wire,
    cntlid: u16,
    nsid: u32,
    blocks: u64,
    in_capsule_bytes: usize,
}

fn admin_connect(addr: SocketAddr, subnqn: &str, digests: bool) -> anyhow::Result<Controller> {
    let mut w = Wire::connect(addr, digests, 64 << 10)?;
    let r = connect_cmd(&mut w, subnqn, 0xffff, 0, 31)?;
    ensure!(r.status == 0, "admin connect: status {:#x}", r.status);
    let cntlid = r.dw0 as u16;
    let mut cc = Sqe::new(0x7f, 1, 0);
    cc.0[4] = 0x00; // Property Set CC.EN with 64 B SQEs / 16 B CQEs
    cc.set32(44, 0x14);
    cc.set64(48, 0x46_0001);
    ensure!(w.exec(cc, &[], &mut [])?.status == 0, "property set CC");
    let mut buf = vec![0u8; 4096];
    let mut id = Sqe::new(0x06, 2, 0);
    id.set32(40, 1); // CNS 1: controller
    ensure!(
        w.exec(id, &[], &mut buf)?.status == 0,
        "identify controller"
    );
    let ioccsz = u32::from_le_bytes(buf[1792..1796].try_into()?) as usize;
    let in_capsule_bytes = (ioccsz * 16).saturating_sub(64);
    let mut id = Sqe::new(0x06, 3, 0);
    id.set32(40, 2); // CNS 2: active namespace list
    ensure!(w.exec(id, &[], &mut buf)?.status == 0, "identify ns list");
    let nsid = u32::from_le_bytes(buf[0..4].try_into()?);
    ensure!(nsid != 0, "the target exposes no namespace to this host");
    let mut id = Sqe::new(0x06, 4, nsid);
    id.set32(40, 0); // CNS 0: namespace
    ensure!(w.exec(id, &[], &mut buf)?.status == 0, "identify namespace");
    let blocks = u64::from_le_bytes(buf[0..8].try_into()?);
    let lbaf = buf[26] & 0xf;
    let lbads = buf[128 + 4 * lbaf as usize + 2];
    ensure!(
        lbads == 12,
        "bench assumes 4 KiB blocks, namespace has 2^{lbads}"
    );
    Ok(Controller {
        _admin: w,
        cntlid,
        nsid,
        blocks,
        in_capsule_bytes,
    })
}

// ---------------------------------------------------------------------------------------------
// One I/O queue: a closed loop on its own thread.

/// What a queue thread needs to know.
#[derive(Clone)]
struct QueueSpec {
    addr: SocketAddr,
    subnqn: String,
    digests: bool,
    cntlid: u16,
    qid: u16,
    nsid: u32,
    blocks: u64,
    in_capsule_bytes: usize,
    job: Job,
    seed: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    issued: Instant,
    write: bool,
}

/// The measured interval; completions outside it are not counted, none are issued after it.
struct Window {
    start: Instant,
    end: Instant,
}

struct QueueResult {
    hist: Histogram,
    bytes: u64,
    errors: u64,
}

struct Generator {
    rng: u64,
    next_lba: u64,
    first_lba: u64,
    span_blocks: u64,
    bs_blocks: u64,
    read_pct: u32,
    random: bool,
}

impl Generator {
    fn new(spec: &QueueSpec) -> Generator {
        let bs_blocks = spec.job.bs as u64 / LBA_BYTES;
        // Sequential queues stream through disjoint parts of the namespace.
        let span = spec.blocks / spec.job.queues as u64 / bs_blocks * bs_blocks;
        let first = span * (spec.qid as u64 - 1);
        Generator {
            rng: spec.seed | 1,
            next_lba: first,
            first_lba: first,
            span_blocks: span.max(bs_blocks),
            bs_blocks,
            read_pct: spec.job.read_pct,
            random: spec.job.random,
        }
    }

    fn rand(&mut self) -> u64 {
        xorshift(&mut self.rng)
    }

    /// (is_write, slba) of the next command.
    fn next(&mut self, blocks: u64) -> (bool, u64) {
        let write = match self.read_pct {
            100 => false,
            0 => true,
            p => (self.rand() % 100) as u32 >= p,
        };
        let lba = if self.random {
            self.rand() % (blocks / self.bs_blocks) * self.bs_blocks
        } else {
            let l = self.next_lba;
            self.next_lba += self.bs_blocks;
            if self.next_lba >= self.first_lba + self.span_blocks {
                self.next_lba = self.first_lba;
            }
            l
        };
        (write, lba)
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
/// pattern. lz4 stores such a block in 5 of 8 sectors, and none is all zeroes (the block
/// store would keep it as a hole).
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

struct IoQueue {
    spec: QueueSpec,
    wire: Wire,
    slots: Vec<Slot>,
    gen: Generator,
    payload: Vec<u8>,
    outstanding: usize,
    /// Commands still to issue (the window's end stops a timed job first).
    budget: u64,
}

impl IoQueue {
    fn connect(spec: QueueSpec) -> anyhow::Result<IoQueue> {
        let job = spec.job;
        let tx_cap = job.qd * (job.bs + 2 * MAX_HDR_BYTES + 8) + (64 << 10);
        // The previous job's queue with this qid may not be torn down yet: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        let wire = loop {
            let mut wire = Wire::connect(spec.addr, spec.digests, tx_cap)?;
            let r = connect_cmd(&mut wire, &spec.subnqn, spec.cntlid, spec.qid, job.qd)?;
            if r.status == 0 {
                break wire;
            }
            ensure!(
                r.status == STATUS_INVALID_QID && Instant::now() < deadline,
                "connect qid {}: status {:#x}",
                spec.qid,
                r.status
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let now = Instant::now();
        Ok(IoQueue {
            gen: Generator::new(&spec),
            wire,
            slots: vec![
                Slot {
                    issued: now,
                    write: false
                };
                job.qd
            ],
            payload: payload(job.bs, spec.seed),
            outstanding: 0,
            budget: u64::MAX,
            spec,
        })
    }

    fn issue(&mut self, cid: u16) {
        let (write, slba) = self.gen.next(self.spec.blocks);
        let bs = self.spec.job.bs;
        let mut c = Sqe::new(if write { 0x01 } else { 0x02 }, cid, self.spec.nsid);
        c.set64(40, slba);
        c.set32(48, (bs as u64 / LBA_BYTES - 1) as u32);
        let inline = write && bs <= self.spec.in_capsule_bytes;
        c.sgl(0, bs as u32, inline);
        let data: &[u8] = if inline { &self.payload } else { &[] };
        self.wire
            .tx
            .push(PduType::CapsuleCmd, 0, &HdrFields::Cmd(&c.0), data);
        self.slots[cid as usize] = Slot {
            issued: Instant::now(),
            write,
        };
        self.outstanding += 1;
        self.budget -= 1;
    }

    /// Answers an R2T with H2CData PDUs of at most MAXH2CDATA bytes.
    fn send_h2c(&mut self, r: pdu::R2t) {
        let (mut off, end) = (r.offset, r.offset + r.length);
        while off < end {
            let n = (end - off).min(self.wire.maxh2c);
            let d = DataHdr {
                cccid: r.cccid,
                ttag: r.ttag,
                offset: off,
                length: n,
            };
            let flags = if off + n == end { FLAG_LAST_PDU } else { 0 };
            let chunk = &self.payload[off as usize..(off + n) as usize];
            self.wire
                .tx
                .push(PduType::H2cData, flags, &HdrFields::Data(d), chunk);
            off += n;
        }
    }

    /// The closed loop: every completion issues the next command until the window ends.
    fn run(&mut self, w: &Window) -> anyhow::Result<QueueResult> {
        let mut res = QueueResult {
            hist: Histogram::new(),
            bytes: 0,
            errors: 0,
        };
        for cid in 0..self.spec.job.qd.min(self.budget as usize) {
            self.issue(cid as u16);
        }
        self.wire.tx.flush(&self.wire.sock)?;
        while self.outstanding > 0 {
            self.wire.rx.fill(&self.wire.sock)?;
            let stopping = Instant::now() >= w.end;
            self.drain(w, stopping, &mut res)?;
            self.wire.tx.flush(&self.wire.sock)?;
        }
        Ok(res)
    }

    fn drain(&mut self, w: &Window, stopping: bool, res: &mut QueueResult) -> anyhow::Result<()> {
        loop {
            // `next` borrows the receive buffer; copy out what the handlers need.
            let ev = match self.wire.rx.next()? {
                None => return Ok(()),
                Some(Pdu::CapsuleResp { cqe }) => {
                    let c = cqe_of(cqe);
                    Event::Done(c.cid, c.status)
                }
                Some(Pdu::C2hData {
                    hdr, last, success, ..
                }) => {
                    if last && success {
                        Event::Done(hdr.cccid, 0)
                    } else {
                        Event::None
                    }
                }
                Some(Pdu::R2t(r)) => Event::R2t(r),
                Some(other) => bail!("unexpected PDU {other:?}"),
            };
            match ev {
                Event::None => {}
                Event::R2t(r) => self.send_h2c(r),
                Event::Done(cid, status) => {
                    self.complete(cid, status, w, res)?;
                    if !stopping && self.budget > 0 {
                        self.issue(cid);
                    }
                }
            }
        }
    }

    fn complete(
        &mut self,
        cid: u16,
        status: u16,
        w: &Window,
        res: &mut QueueResult,
    ) -> anyhow::Result<()> {
        let Some(slot) = self.slots.get(cid as usize).copied() else {
            bail!("completion for unknown cid {cid}");
        };
        self.outstanding -= 1;
        let now = Instant::now();
        if status != 0 {
            res.errors += 1;
            let what = if slot.write { "write" } else { "read" };
            bail!("{what} cid {cid} failed with status {status:#x}");
        }
        if now >= w.start && now < w.end {
            res.hist.record((now - slot.issued).as_nanos() as u64);
            res.bytes += self.spec.job.bs as u64;
        }
        Ok(())
    }
}

enum Event {
    None,
    Done(u16, u16),
    R2t(pdu::R2t),
}

// ---------------------------------------------------------------------------------------------
// The server under test.

struct Server {
    child: Child,
    dir: tempfile::TempDir,
    api: String,
    nvme: SocketAddr,
    agent: ureq::Agent,
    token: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A fresh directory on tmpfs (where there is one) for a target's data.
fn bench_dir() -> anyhow::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let mut b = tempfile::Builder::new();
    b.prefix("evstor-bench-");
    Ok(if shm.is_dir() {
        b.tempdir_in(shm)?
    } else {
        b.tempdir()?
    })
}

impl Server {
    fn start(bin: &Path) -> anyhow::Result<Server> {
        let dir = bench_dir()?;
        let (api_port, nvme_port, disc_port) = (free_port()?, free_port()?, free_port()?);
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--api-addr")
            .arg(format!("127.0.0.1:{api_port}"))
            .arg("--nvme-addr")
            .arg(format!("127.0.0.1:{nvme_port}"))
            .arg("--discovery-addr")
            .arg(format!("127.0.0.1:{disc_port}"))
            .env("EVSTOR_LOG", "warn")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {} (build it with --release)", bin.display()))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .disable_verification(true)
                    .build(),
            )
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let mut s = Server {
            child,
            dir,
            api: format!("https://127.0.0.1:{api_port}"),
            nvme: SocketAddr::from(([127, 0, 0, 1], nvme_port)),
            agent,
            token: String::new(),
        };
        s.wait_ready()?;
        Ok(s)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let jwt = self.dir.path().join("admin.jwt");
        loop {
            if let Ok(t) = std::fs::read_to_string(&jwt) {
                self.token = t.trim().to_string();
                if matches!(self.get("/api/v2/version"), Ok((200, _))) {
                    return Ok(());
                }
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("evstor exited with {st}: {}", self.log());
            }
            ensure!(
                Instant::now() < deadline,
                "evstor did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn finish(
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut r = r?;
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string()?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let req = self
            .agent
            .get(format!("{}{path}", self.api))
            .header("Authorization", format!("Bearer {}", self.token));
        Self::finish(req.call())
    }

    fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let req = self
            .agent
            .post(format!("{}{path}", self.api))
            .header("Authorization", format!("Bearer {}", self.token))
            .content_type("application/json");
        Self::finish(req.send(body.to_string()))
    }

    /// Creates the bench volume and waits until it is served; returns its UUID and the
    /// subsystem NQN.
    fn create_volume(&self, compress: bool) -> anyhow::Result<(String, String)> {
        let body = json!({
            "name": "bench",
            "size": "1 GiB",
            "acl": {"values": ["ALLOW_ANY"]},
            "replicaCount": 1,
            "compression": if compress { "true" } else { "false" },
        });
        let (st, v) = self.post("/api/v2/projects/default/volumes", &body)?;
        ensure!(st == 200, "create volume: {st} {v}");
        let uuid = v["UUID"].as_str().context("volume UUID")?.to_string();
        self.wait_available(&format!("/api/v2/projects/default/volumes/{uuid}"))?;
        let (st, ci) = self.get("/api/v2/clusterinfo")?;
        ensure!(st == 200, "clusterinfo: {st} {ci}");
        let nqn = ci["subsystemNQN"].as_str().context("subsystemNQN")?;
        Ok((uuid, nqn.to_string()))
    }

    /// Snapshots the volume over the API and waits until the snapshot is Available.
    fn snapshot(&self, volume: &str) -> anyhow::Result<()> {
        let body = json!({"name": "s1", "sourceVolumeUUID": volume});
        let (st, v) = self.post("/api/v2/projects/default/snapshots", &body)?;
        ensure!(st == 200, "create snapshot: {st} {v}");
        let uuid = v["UUID"].as_str().context("snapshot UUID")?;
        self.wait_available(&format!("/api/v2/projects/default/snapshots/{uuid}"))
    }

    fn wait_available(&self, path: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (st, v) = self.get(path)?;
            if st == 200 && v["state"] == "Available" {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "{path} not Available: {st} {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The volume's logical / stored bytes, as the API reports it.
    fn compression_ratio(&self, volume: &str) -> anyhow::Result<f64> {
        let (st, v) = self.get(&format!("/api/v2/projects/default/volumes/{volume}"))?;
        ensure!(st == 200, "get volume: {st} {v}");
        v["statistics"]["compressionRatio"]
            .as_f64()
            .context("statistics.compressionRatio")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The in-process target: the data path alone, for the file baseline and the bare block store.

struct InProcess {
    // Fields drop in order: the target stops before the store closes and the directory goes.
    target: TargetHandle,
    store: Option<Arc<BlockStore>>,
    volume: Uuid,
    _dir: tempfile::TempDir,
}

impl InProcess {
    /// Starts the target from a thread on `cpu` (when given): the target's listener and
    /// reactor threads, and RocksDB's, inherit that thread's affinity.
    fn start(kind: Kind, cpu: Option<usize>) -> anyhow::Result<InProcess> {
        let dir = bench_dir()?;
        std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                pin(0, cpu)?;
            }
            Self::serve(kind, dir)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("starting the in-process target panicked"))?
    }

    fn serve(kind: Kind, dir: tempfile::TempDir) -> anyhow::Result<InProcess> {
        let root = dir.path();
        let volume = Uuid::new_v4();
        let (backing, store) = if kind == Kind::File {
            (Backing::File(root.join("volume.img")), None)
        } else {
            let dev = DeviceSpec {
                path: root.join("dev0.img"),
                size_bytes: STORE_DEVICE_BYTES,
            };
            let store = BlockStore::open(&root.join("meta"), &[dev])?;
            store.create_volume(volume)?;
            let compress = kind.compress();
            let backing = Backing::Image {
                store: store.clone(),
                compress,
                replication: None,
            };
            (backing, Some(store))
        };
        let ns = NamespaceSpec {
            nsid: 1,
            uuid: *volume.as_bytes(),
            size_bytes: VOLUME_BYTES,
            backing,
            host_acl: Acl::AllowAny,
            ip_acl: Acl::AllowAny,
            qos: QosLimits::default(),
            ana: Default::default(),
        };
        let cfg = TargetConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), IN_PROCESS_NQN);
        Ok(InProcess {
            target: evstor_datapath::start(cfg, vec![ns])?,
            store,
            volume,
            _dir: dir,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// A target under test, whichever serves it.

enum Target {
    Serve {
        srv: Server,
        volume: String,
        subnqn: String,
    },
    InProcess(InProcess),
}

impl Target {
    fn start(kind: Kind, opts: &Opts) -> anyhow::Result<Target> {
        let cpu = opts.pinned.then_some(0);
        if !kind.served() {
            return Ok(Target::InProcess(InProcess::start(kind, cpu)?));
        }
        let srv = Server::start(&opts.bin)?;
        let (volume, subnqn) = srv.create_volume(kind.compress())?;
        if let Some(cpu) = cpu {
            pin(srv.pid(), cpu)?;
        }
        Ok(Target::Serve {
            srv,
            volume,
            subnqn,
        })
    }

    fn nvme(&self) -> SocketAddr {
        match self {
            Target::Serve { srv, .. } => srv.nvme,
            Target::InProcess(t) => t.target.local_addr(),
        }
    }

    fn subnqn(&self) -> &str {
        match self {
            Target::Serve { subnqn, .. } => subnqn,
            Target::InProcess(_) => IN_PROCESS_NQN,
        }
    }

    /// Pins the server's threads to CPU 0 again: its reactor threads inherit
    /// CPU 0, but be sure. An in-process target's threads all inherit it.
    fn repin(&self) -> anyhow::Result<()> {
        match self {
            Target::Serve { srv, .. } => pin(srv.pid(), 0),
            Target::InProcess(_) => Ok(()),
        }
    }

    fn snapshot(&self) -> anyhow::Result<()> {
        match self {
            Target::Serve { srv, volume, .. } => srv.snapshot(volume),
            Target::InProcess(t) => {
                let store = t.store.as_ref().context("a file volume has no snapshots")?;
                Ok(store.snapshot(t.volume, Uuid::new_v4())?)
            }
        }
    }

    /// The volume's logical / stored bytes (None for a file volume).
    fn compression_ratio(&self) -> anyhow::Result<Option<f64>> {
        match self {
            Target::Serve { srv, volume, .. } => Ok(Some(srv.compression_ratio(volume)?)),
            Target::InProcess(t) => {
                let Some(store) = &t.store else {
                    return Ok(None);
                };
                let u = store.usage(t.volume)?;
                let r = evstor_datapath::blockstore::ratio(u.owned_logical_bytes, u.owned_bytes);
                Ok(Some(r))
            }
        }
    }

    /// CPU seconds used so far by (the target, the initiator).
    fn cpu_secs(&self) -> anyhow::Result<(f64, f64)> {
        let host = initiator_cpu_secs()?;
        let target = match self {
            Target::Serve { srv, .. } => stat_cpu_secs(&format!("/proc/{}/stat", srv.pid()))?,
            // Exited threads stay in the process total; the initiator's threads outlive the
            // measured window, so the difference is the target's (and nothing else runs).
            Target::InProcess(_) => stat_cpu_secs("/proc/self/stat")? - host,
        };
        Ok((target, host))
    }
}

// ---------------------------------------------------------------------------------------------
// CPU placement and accounting.

/// The calling thread's CPU set.
fn affinity() -> anyhow::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most size_of_val(&set) bytes into the local set.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    ensure!(
        r == 0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    Ok(set)
}

/// Pins every thread of `pid` (0: the calling thread) to `cpu`; later threads inherit it.
fn pin(pid: u32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of the local set; cpu < CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set_affinity(pid, &set)
}

/// Sets the CPU set of every thread of `pid` (0: the calling thread).
fn set_affinity(pid: u32, set: &libc::cpu_set_t) -> anyhow::Result<()> {
    let tids: Vec<i32> = if pid == 0 {
        vec![0]
    } else {
        std::fs::read_dir(format!("/proc/{pid}/task"))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    };
    for tid in tids {
        // SAFETY: passes a valid cpu_set_t of the size given; the kernel only reads it.
        let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(set), set) };
        let e = std::io::Error::last_os_error();
        // ESRCH: the thread exited after the directory was read; there is nothing to pin.
        ensure!(
            r == 0 || e.raw_os_error() == Some(libc::ESRCH),
            "sched_setaffinity({tid}): {e}"
        );
    }
    Ok(())
}

/// utime + stime from a `/proc/.../stat` file (a process's or one thread's), in seconds.
fn stat_cpu_secs(path: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(path)?;
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// CPU seconds of the initiator: this process's main thread and its queue threads.
fn initiator_cpu_secs() -> anyhow::Result<f64> {
    let main_tid = std::process::id();
    let mut secs = 0.0;
    for e in std::fs::read_dir("/proc/self/task")? {
        let Some(tid) = e?.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        // A thread that exits between the listing and these reads counts for nothing.
        let dir = format!("/proc/self/task/{tid}");
        let Ok(comm) = std::fs::read_to_string(format!("{dir}/comm")) else {
            continue;
        };
        if tid == main_tid || comm.starts_with(QUEUE_THREAD_PREFIX) {
            secs += stat_cpu_secs(&format!("{dir}/stat")).unwrap_or(0.0);
        }
    }
    Ok(secs)
}

// ---------------------------------------------------------------------------------------------
// Running a job.

struct Report {
    kind: Kind,
    name: String,
    iops: f64,
    mib_s: f64,
    hist: Histogram,
    target_cpu_s: f64,
    host_cpu_s: f64,
    secs: f64,
}

fn queue_spec(ctrl: &Controller, target: &Target, digests: bool, job: Job, qid: u16) -> QueueSpec {
    QueueSpec {
        addr: target.nvme(),
        subnqn: target.subnqn().to_string(),
        digests,
        cntlid: ctrl.cntlid,
        qid,
        nsid: ctrl.nsid,
        blocks: ctrl.blocks,
        in_capsule_bytes: ctrl.in_capsule_bytes,
        job,
        seed: 0x9e37_79b9_7f4a_7c15 ^ ((qid as u64) << 32),
    }
}

fn run_job(
    ctrl: &Controller,
    target: &Target,
    opts: &Opts,
    kind: Kind,
    job: Job,
) -> anyhow::Result<Report> {
    let now = Instant::now();
    let start = now + Duration::from_secs_f64(opts.warmup_secs + 0.2);
    let end = start + Duration::from_secs_f64(opts.secs);
    let ready = Arc::new(Barrier::new(job.queues + 1));
    // Queue threads outlive the last CPU sample: a thread that has exited no longer shows
    // in /proc/self/task, and the initiator's CPU time is summed from there.
    let sampled = Arc::new(Barrier::new(job.queues + 1));
    let mut handles = Vec::new();
    for q in 0..job.queues {
        let spec = queue_spec(ctrl, target, opts.digests, job, q as u16 + 1);
        let (ready, sampled) = (ready.clone(), sampled.clone());
        let thread = std::thread::Builder::new().name(format!("{QUEUE_THREAD_PREFIX}{}", q + 1));
        handles.push(thread.spawn(move || -> anyhow::Result<QueueResult> {
            let queue = IoQueue::connect(spec);
            ready.wait();
            let r = queue.and_then(|mut q| q.run(&Window { start, end }));
            sampled.wait();
            r
        })?);
    }
    ready.wait();
    if opts.pinned {
        target.repin()?;
    }
    std::thread::sleep(start.saturating_duration_since(Instant::now()));
    let (t0, h0) = target.cpu_secs()?;
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let t1h1 = target.cpu_secs();
    sampled.wait();
    let (t1, h1) = t1h1?;
    let mut hist = Histogram::new();
    let mut bytes = 0;
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("queue thread panicked"))??;
        ensure!(r.errors == 0, "{} I/O errors", r.errors);
        hist.merge(&r.hist);
        bytes += r.bytes;
    }
    Ok(Report {
        kind,
        name: job.name(),
        iops: hist.total as f64 / opts.secs,
        mib_s: bytes as f64 / opts.secs / (1 << 20) as f64,
        hist,
        target_cpu_s: t1 - t0,
        host_cpu_s: h1 - h0,
        secs: opts.secs,
    })
}

/// Writes the whole namespace once, sequentially in 128 KiB commands, so reads hit
/// allocated blocks, not holes.
fn precondition(ctrl: &Controller, target: &Target, digests: bool) -> anyhow::Result<()> {
    let job = job(PREFILL_BS_BYTES, 16, 0, false, 1);
    let mut q = IoQueue::connect(queue_spec(ctrl, target, digests, job, 1))?;
    q.budget = ctrl.blocks / (PREFILL_BS_BYTES as u64 / LBA_BYTES);
    let far = Instant::now() + Duration::from_secs(3600);
    q.run(&Window {
        start: far,
        end: far,
    })?;
    Ok(())
}

/// One kind: a fresh target and volume, the prefill (and snapshot), then every job.
fn run_kind(kind: Kind, opts: &Opts) -> anyhow::Result<Vec<Report>> {
    let target = Target::start(kind, opts)?;
    if opts.pinned {
        pin(0, 1)?;
    }
    let ctrl = admin_connect(target.nvme(), target.subnqn(), opts.digests)?;
    let t = Instant::now();
    precondition(&ctrl, &target, opts.digests)?;
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
    for &job in &opts.jobs {
        let r = run_job(&ctrl, &target, opts, kind, job)?;
        print_report(&r);
        reports.push(r);
    }
    Ok(reports)
}

// ---------------------------------------------------------------------------------------------
// Output.

fn print_header(opts: &Opts) {
    println!(
        "nvme_load: {} s per job (+{:.1} s warm-up), digests {}, {}",
        opts.secs,
        opts.warmup_secs,
        if opts.digests { "on" } else { "off" },
        if opts.pinned {
            "target pinned to CPU 0, initiator to CPU 1"
        } else {
            "not pinned (fewer than 2 CPUs)"
        }
    );
    println!(
        "{:<12} {:<22} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>7} {:>9} {:>10} {:>7}",
        "kind",
        "job",
        "IOPS",
        "MiB/s",
        "avg us",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "tgt %",
        "tgt s/MIO",
        "IOPS/core",
        "host %"
    );
}

fn print_report(r: &Report) {
    let us = |ns: u64| ns as f64 / 1000.0;
    let ios = r.hist.total as f64;
    let tgt_pct = 100.0 * r.target_cpu_s / r.secs;
    let per_mio = if ios > 0.0 {
        r.target_cpu_s / (ios / 1e6)
    } else {
        0.0
    };
    let per_core = if r.target_cpu_s > 0.0 {
        ios / r.target_cpu_s
    } else {
        0.0
    };
    println!(
        "{:<12} {:<22} {:>9.0} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>7.0} {:>9.2} {:>10.0} {:>7.0}",
        r.kind.name(),
        r.name,
        r.iops,
        r.mib_s,
        r.hist.mean_ns() / 1000.0,
        us(r.hist.percentile_ns(50.0)),
        us(r.hist.percentile_ns(99.0)),
        us(r.hist.percentile_ns(99.9)),
        tgt_pct,
        per_mio,
        per_core,
        100.0 * r.host_cpu_s / r.secs,
    );
}

/// One kind x job over all rounds: IOPS and IOPS per target core of each round, latencies
/// of all.
struct Cell {
    kind: Kind,
    name: String,
    iops: Vec<f64>,
    per_core: Vec<f64>,
    hist: Histogram,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn cells(reports: &[Report]) -> Vec<Cell> {
    let mut cells: Vec<Cell> = Vec::new();
    for r in reports {
        let at = cells
            .iter()
            .position(|c| c.kind == r.kind && c.name == r.name);
        let c = match at {
            Some(i) => &mut cells[i],
            None => {
                cells.push(Cell {
                    kind: r.kind,
                    name: r.name.clone(),
                    iops: Vec::new(),
                    per_core: Vec::new(),
                    hist: Histogram::new(),
                });
                cells.last_mut().expect("just pushed")
            }
        };
        c.iops.push(r.iops);
        if r.target_cpu_s > 0.0 {
            c.per_core.push(r.hist.total as f64 / r.target_cpu_s);
        }
        c.hist.merge(&r.hist);
    }
    cells
}

/// `value / file's value` for the same job, and whether it meets the goal.
fn versus(cells: &[Cell], c: &Cell, value: impl Fn(&Cell) -> f64) -> (String, &'static str) {
    let base = cells
        .iter()
        .find(|b| b.kind == Kind::File && b.name == c.name)
        .map(&value)
        .filter(|&b| b > 0.0);
    match base {
        Some(_) if c.kind == Kind::File => ("1.000x".to_string(), "-"),
        Some(b) => {
            let x = value(c) / b;
            (
                format!("{x:.3}x"),
                if x >= GOAL_RATIO { "met" } else { "MISS" },
            )
        }
        None => ("-".to_string(), "-"),
    }
}

/// Each kind x job beside `file`'s for the same job: median IOPS over the rounds (and the
/// range), latency percentiles over all rounds' I/Os, the ratio of medians and the goal; then
/// the median IOPS per second of target CPU and its ratio, which depends far less on how much
/// CPU other work leaves the target.
fn print_summary(reports: &[Report], rounds: usize) {
    println!(
        "\nsummary over {rounds} round(s): median IOPS, and IOPS per target core, as multiples \
         of the file-per-volume baseline's (goal >= {GOAL_RATIO}x)"
    );
    println!(
        "{:<12} {:<11} {:<22} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8} {:>4} {:>9} {:>8} {:>4}",
        "kind",
        "target",
        "job",
        "IOPS",
        "min",
        "max",
        "p50 us",
        "p99 us",
        "vs file",
        "goal",
        "IOPS/core",
        "vs file",
        "goal"
    );
    let cells = cells(reports);
    for c in &cells {
        let iops = median(&c.iops);
        let per_core = median(&c.per_core);
        let (ratio, goal) = versus(&cells, c, |c| median(&c.iops));
        let (core_ratio, core_goal) = versus(&cells, c, |c| median(&c.per_core));
        let min = c.iops.iter().copied().fold(f64::INFINITY, f64::min);
        let max = c.iops.iter().copied().fold(0.0, f64::max);
        println!(
            "{:<12} {:<11} {:<22} {:>8.0} {:>8.0} {:>8.0} {:>7.1} {:>7.1} {:>8} {:>4} {:>9.0} {:>8} {:>4}",
            c.kind.name(),
            if c.kind.served() { "serve" } else { "in-process" },
            c.name,
            iops,
            min,
            max,
            c.hist.percentile_ns(50.0) as f64 / 1000.0,
            c.hist.percentile_ns(99.0) as f64 / 1000.0,
            ratio,
            goal,
            per_core,
            core_ratio,
            core_goal
        );
    }
}

fn main() -> anyhow::Result<()> {
    let opts = parse_opts()?;
    let all_cpus = affinity()?;
    print_header(&opts);
    let mut reports = Vec::new();
    for round in 0..opts.rounds {
        // Odd rounds go backwards, so drift in the background load favours no kind.
        let mut kinds = opts.kinds.clone();
        if round % 2 == 1 {
            kinds.reverse();
        }
        for kind in kinds {
            // Start-up (server, RocksDB) may use every CPU; run_kind pins once it is done.
            set_affinity(0, &all_cpus)?;
            reports.extend(run_kind(kind, &opts)?);
        }
    }
    print_summary(&reports, opts.rounds);
    Ok(())
}
