//! What nvme_load prints: a line per job, the summary against the file baseline, and the
//! `--scale` figures.

use crate::histogram::Histogram;
use crate::target::Kind;

/// The goal: every kind reaches this multiple of the file baseline's IOPS.
const GOAL_RATIO: f64 = 0.8;

pub struct Report {
    pub kind: Kind,
    pub name: String,
    pub iops: f64,
    pub mib_s: f64,
    pub hist: Histogram,
    pub target_cpu_s: f64,
    pub host_cpu_s: f64,
    pub secs: f64,
}

pub fn print_header(secs: f64, warmup_secs: f64, digests: bool, pinned: bool) {
    println!(
        "nvme_load: {secs} s per job (+{warmup_secs:.1} s warm-up), digests {}, {}",
        if digests { "on" } else { "off" },
        if pinned {
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

pub fn print_report(r: &Report) {
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
pub fn print_summary(reports: &[Report], rounds: usize) {
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

/// What `--scale` measured.
pub struct Scale<'a> {
    pub connected: usize,
    pub sessions: usize,
    pub active: usize,
    pub qd: u16,
    pub secs: f64,
    pub connect_s: f64,
    pub hist: &'a Histogram,
    /// Commands completed with an error status.
    pub errors: u64,
    /// Queues that ended with a transport error.
    pub failed: usize,
    /// Target VmRSS after the prefill, with every queue connected, after the run; VmHWM.
    pub rss_kib: [u64; 4],
}

pub fn print_scale(s: &Scale<'_>) {
    let us = |p: f64| s.hist.percentile_ns(p) as f64 / 1000.0;
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "scale: {} I/O queues connected ({} controllers, connected in {:.1} s), {} busy \
         with 4k random reads at QD{} for {} s",
        s.connected, s.sessions, s.connect_s, s.active, s.qd, s.secs
    );
    println!(
        "  IOPS {:.0}  p50 {:.1} us  p99 {:.1} us  p99.9 {:.1} us  errors {}  failed queues {}",
        s.hist.total as f64 / s.secs,
        us(50.0),
        us(99.0),
        us(99.9),
        s.errors,
        s.failed
    );
    let [prefilled, idle, after, hwm] = s.rss_kib;
    println!(
        "  target RSS: {:.1} MiB after prefill, {:.1} MiB with all queues connected \
         ({:.1} KiB per I/O queue, admin queues included), {:.1} MiB after the run, peak (VmHWM) {:.1} MiB",
        mib(prefilled),
        mib(idle),
        idle.saturating_sub(prefilled) as f64 / s.connected.max(1) as f64,
        mib(after),
        mib(hwm)
    );
}
