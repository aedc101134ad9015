//! `nvme_load`: a closed-loop NVMe/TCP load generator against the real `evstor serve`.
//!
//! It starts the release binary on free loopback ports with a data directory on tmpfs,
//! creates a 1 GiB volume over the REST API, pins the server to CPU 0 and itself to
//! CPU 1, then drives the target with its own initiator (built on the crate's PDU
//! codec): ICReq, Fabrics Connect (admin + one TCP connection and one thread per I/O
//! queue), Identify, then I/O at a fixed queue depth. It prints IOPS, MiB/s, latency
//! percentiles and the server's CPU seconds per million I/Os (from /proc/<pid>/stat).
//!
//! ```text
//! cargo bench --bench nvme_load                    # the default scenario suite
//! cargo bench --bench nvme_load -- --quick         # ~1 s per scenario (smoke)
//! cargo bench --bench nvme_load -- --digests       # header and data digests on
//! cargo bench --bench nvme_load -- --rw randread --bs 4096 --qd 32 --queues 2 --secs 10
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
use evstor_datapath::limits::MAX_HDR_BYTES;
use evstor_datapath::pdu::{
    self, Check, DataHdr, HdrFields, IcReq, Pdu, PduType, RxContext, TxContext, FLAG_LAST_PDU,
    IC_DDGST_ENABLE, IC_HDGST_ENABLE,
};
use serde_json::{json, Value};

const HOST_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:6e766d65-6c6f-6164-0000-62656e636821";
/// Receive buffer per connection: many responses plus a maximal data PDU.
const RX_BUF_BYTES: usize = 4 << 20;
/// Largest data PDU the initiator accepts.
const MAX_RX_DATA_BYTES: u32 = 1 << 20;
/// Largest block size the bench issues (the target's MDTS is 128 KiB).
const MAX_BS_BYTES: usize = 128 * 1024;
/// Deepest queue the bench asks for (the target's MAX_QUEUE_DEPTH is 128, SQSIZE is 0-based).
const MAX_QD: usize = 127;
const LBA_BYTES: u64 = 4096;
/// Connect refused because the queue ID is in use (SCT 1, SC 1).
const STATUS_INVALID_QID: u16 = 0x101;
const START_TIMEOUT: Duration = Duration::from_secs(60);

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
        let bs = if self.bs % 1024 == 0 {
            format!("{}k", self.bs / 1024)
        } else {
            format!("{}", self.bs)
        };
        format!("{bs} {kind} qd{} x{}q", self.qd, self.queues)
    }
}

struct Opts {
    secs: f64,
    warmup_secs: f64,
    digests: bool,
    jobs: Vec<Job>,
    bin: PathBuf,
}

fn default_suite(queues: usize) -> Vec<Job> {
    let j = |bs, qd, read_pct, random| Job {
        bs,
        qd,
        read_pct,
        random,
        queues,
    };
    vec![
        j(4096, 1, 100, true),
        j(4096, 32, 100, true),
        j(4096, 1, 0, true),
        j(4096, 32, 0, true),
        j(128 * 1024, 32, 100, false),
        j(128 * 1024, 32, 0, false),
    ]
}

fn usage() -> ! {
    eprintln!(
        "usage: nvme_load [--quick] [--digests] [--secs S] [--warmup S] [--queues N]\n\
         \x20                [--rw randread|randwrite|read|write|randrw|rw] [--rwmixread PCT]\n\
         \x20                [--bs BYTES] [--qd N] [--bin PATH]\n\
         any of --rw/--bs/--qd runs one custom job instead of the default suite;\n\
         NVME_LOAD_SECS sets the default duration."
    );
    std::process::exit(2)
}

fn parse_opts() -> anyhow::Result<Opts> {
    let mut secs: f64 = std::env::var("NVME_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6.0);
    let mut warmup = None;
    let (mut digests, mut quick, mut queues) = (false, false, 1usize);
    let (mut rw, mut bs, mut qd, mut mix) = (None::<String>, None::<usize>, None::<usize>, 50u32);
    let mut bin = PathBuf::from(env!("CARGO_BIN_EXE_evstor"));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--quick" => quick = true,
            "--digests" => digests = true,
            "--bench" => {} // cargo bench passes this to harness = false targets
            "--secs" => secs = val().parse()?,
            "--warmup" => warmup = Some(val().parse()?),
            "--queues" => queues = val().parse()?,
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
    let jobs = if rw.is_none() && bs.is_none() && qd.is_none() {
        default_suite(queues)
    } else {
        let (read_pct, random) = match rw.as_deref().unwrap_or("randread") {
            "randread" => (100, true),
            "randwrite" => (0, true),
            "read" => (100, false),
            "write" => (0, false),
            "randrw" => (mix.min(100), true),
            "rw" => (mix.min(100), false),
            _ => usage(),
        };
        vec![Job {
            bs: bs.unwrap_or(4096),
            qd: qd.unwrap_or(1),
            read_pct,
            random,
            queues,
        }]
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
        bin,
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
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
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
            payload: (0..job.bs).map(|i| (i * 31 + 7) as u8).collect(),
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

impl Server {
    fn start(bin: &Path) -> anyhow::Result<Server> {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("evstor-bench-")
                .tempdir_in(shm)?
        } else {
            tempfile::Builder::new().prefix("evstor-bench-").tempdir()?
        };
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

    /// Creates the bench volume and waits until it is served; returns the subsystem NQN.
    fn create_volume(&self) -> anyhow::Result<String> {
        let body = json!({"name": "bench", "size": "1 GiB", "acl": {"values": ["ALLOW_ANY"]}, "replicaCount": 1});
        let (st, v) = self.post("/api/v2/projects/default/volumes", &body)?;
        ensure!(st == 200, "create volume: {st} {v}");
        let uuid = v["UUID"].as_str().context("volume UUID")?.to_string();
        let path = format!("/api/v2/projects/default/volumes/{uuid}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (st, v) = self.get(&path)?;
            if st == 200 && v["state"] == "Available" {
                break;
            }
            ensure!(Instant::now() < deadline, "volume not Available: {st} {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (st, ci) = self.get("/api/v2/clusterinfo")?;
        ensure!(st == 200, "clusterinfo: {st} {ci}");
        Ok(ci["subsystemNQN"]
            .as_str()
            .context("subsystemNQN")?
            .to_string())
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
// CPU placement and accounting.

/// Pins every thread of `pid` (0: the calling thread) to `cpu`; later threads inherit it.
fn pin(pid: u32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of the local set; cpu < CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    let tids: Vec<i32> = if pid == 0 {
        vec![0]
    } else {
        std::fs::read_dir(format!("/proc/{pid}/task"))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    };
    for tid in tids {
        // SAFETY: passes a valid cpu_set_t of the size given; the kernel only reads it.
        let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
        let e = std::io::Error::last_os_error();
        // ESRCH: the thread exited after the directory was read; there is nothing to pin.
        ensure!(
            r == 0 || e.raw_os_error() == Some(libc::ESRCH),
            "sched_setaffinity({tid}): {e}"
        );
    }
    Ok(())
}

/// utime + stime of a whole process, in seconds.
fn cpu_secs(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

// ---------------------------------------------------------------------------------------------
// Running a job.

struct Report {
    name: String,
    iops: f64,
    mib_s: f64,
    hist: Histogram,
    target_cpu_s: f64,
    host_cpu_s: f64,
    secs: f64,
}

fn run_job(
    ctrl: &Controller,
    srv: &Server,
    subnqn: &str,
    opts: &Opts,
    job: Job,
) -> anyhow::Result<Report> {
    let now = Instant::now();
    let start = now + Duration::from_secs_f64(opts.warmup_secs + 0.2);
    let end = start + Duration::from_secs_f64(opts.secs);
    let ready = Arc::new(Barrier::new(job.queues + 1));
    let mut handles = Vec::new();
    for q in 0..job.queues {
        let spec = QueueSpec {
            addr: srv.nvme,
            subnqn: subnqn.to_string(),
            digests: opts.digests,
            cntlid: ctrl.cntlid,
            qid: q as u16 + 1,
            nsid: ctrl.nsid,
            blocks: ctrl.blocks,
            in_capsule_bytes: ctrl.in_capsule_bytes,
            job,
            seed: 0x9e37_79b9_7f4a_7c15 ^ ((q as u64 + 1) << 32),
        };
        let ready = ready.clone();
        handles.push(std::thread::spawn(
            move || -> anyhow::Result<QueueResult> {
                let queue = IoQueue::connect(spec);
                ready.wait();
                let mut queue = queue?;
                queue.run(&Window { start, end })
            },
        ));
    }
    ready.wait();
    pin(srv.pid(), 0)?; // connection threads are new; they inherited CPU 0, but be sure
    let pid = srv.pid().to_string();
    std::thread::sleep(start.saturating_duration_since(Instant::now()));
    let (t0, h0) = (cpu_secs(&pid)?, cpu_secs("self")?);
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let (t1, h1) = (cpu_secs(&pid)?, cpu_secs("self")?);
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
        name: job.name(),
        iops: hist.total as f64 / opts.secs,
        mib_s: bytes as f64 / opts.secs / (1 << 20) as f64,
        hist,
        target_cpu_s: t1 - t0,
        host_cpu_s: h1 - h0,
        secs: opts.secs,
    })
}

/// Writes the whole namespace once so reads hit allocated blocks, not holes.
fn precondition(
    ctrl: &Controller,
    srv: &Server,
    subnqn: &str,
    digests: bool,
) -> anyhow::Result<()> {
    let job = Job {
        bs: MAX_BS_BYTES,
        qd: 16,
        read_pct: 0,
        random: false,
        queues: 1,
    };
    let spec = QueueSpec {
        addr: srv.nvme,
        subnqn: subnqn.to_string(),
        digests,
        cntlid: ctrl.cntlid,
        qid: 1,
        nsid: ctrl.nsid,
        blocks: ctrl.blocks,
        in_capsule_bytes: ctrl.in_capsule_bytes,
        job,
        seed: 1,
    };
    let mut q = IoQueue::connect(spec)?;
    q.budget = ctrl.blocks / (MAX_BS_BYTES as u64 / LBA_BYTES);
    let far = Instant::now() + Duration::from_secs(3600);
    q.run(&Window {
        start: far,
        end: far,
    })?;
    Ok(())
}

fn print_header(opts: &Opts) {
    println!(
        "nvme_load: {} s per job (+{:.1} s warm-up), digests {}, target pinned to CPU 0, initiator to CPU 1",
        opts.secs,
        opts.warmup_secs,
        if opts.digests { "on" } else { "off" }
    );
    println!(
        "{:<26} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>7} {:>9} {:>10} {:>7}",
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
        "{:<26} {:>9.0} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>7.0} {:>9.2} {:>10.0} {:>7.0}",
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

fn main() -> anyhow::Result<()> {
    let opts = parse_opts()?;
    let two_cpus = std::thread::available_parallelism()
        .map(|n| n.get() >= 2)
        .unwrap_or(false);
    let srv = Server::start(&opts.bin)?;
    let subnqn = srv.create_volume()?;
    if two_cpus {
        pin(srv.pid(), 0)?;
        pin(0, 1)?;
    } else {
        eprintln!("nvme_load: fewer than 2 CPUs; not pinning");
    }
    let ctrl = admin_connect(srv.nvme, &subnqn, opts.digests)?;
    precondition(&ctrl, &srv, &subnqn, opts.digests)?;
    print_header(&opts);
    for job in opts.jobs.clone() {
        let r = run_job(&ctrl, &srv, &subnqn, &opts, job)?;
        print_report(&r);
    }
    Ok(())
}
