//! `blockstore_open`: what the block store's metadata costs: bytes of memory per mapped block
//! (measured with a counting allocator, for a sequentially written, a randomly written and a
//! sparsely written map, next to the per-block `BTreeMap` of format 1), CRC32C throughput,
//! and the time and memory to open a store holding one large, fully and sequentially written
//! volume (1 TiB by default: 268 M blocks, 4 M chunk rows).
//!
//! Only metadata matters for opening, so the volume's rows are written directly
//! (`Meta::write_sequential_volume`) over a sparse pool file; no data is written. The rows are
//! flushed to SST files before the open, as a long-running store's would be.
//!
//! ```text
//! cargo bench --bench blockstore_open                      # 1 TiB in /dev/shm
//! cargo bench --bench blockstore_open -- --tib 0.25 --dir /var/tmp
//! cargo bench --bench blockstore_open -- --no-open         # memory and CRC figures only
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use evstor_datapath::blockstore::map::{BlockMap, Extent};
use evstor_datapath::blockstore::meta::Meta;
use evstor_datapath::blockstore::{BlockStore, DeviceSpec};
use uuid::Uuid;

/// Live heap bytes.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as ours.
        unsafe { System.alloc(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: p came from System.alloc with this layout.
        unsafe { System.dealloc(p, l) }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as ours.
        unsafe { System.alloc_zeroed(l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: p came from System with layout l.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Format 1's in-memory entry, for the comparison.
#[allow(dead_code)]
#[derive(Clone, Copy)]
struct OldExtent {
    sector: u64,
    len: u16,
    compressed: bool,
    crc: u32,
}

fn raw(page: u64) -> Extent {
    Extent {
        sector: page * 8,
        len: 4096,
        compressed: false,
        crc: page as u32,
    }
}

fn old(e: Extent) -> OldExtent {
    OldExtent {
        sector: e.sector,
        len: e.len,
        compressed: e.compressed,
        crc: e.crc,
    }
}

/// The (block, extent) sequence of a pattern: the allocator hands out pages in write order.
fn pattern(kind: &str, blocks: u64) -> Vec<(u64, Extent)> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    match kind {
        "sequential" => (0..blocks).map(|b| (b, raw(b))).collect(),
        // Every block once, in a random order.
        "random" => {
            let mut order: Vec<u64> = (0..blocks).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            order
                .into_iter()
                .enumerate()
                .map(|(p, b)| (b, raw(p as u64)))
                .collect()
        }
        // One block in 64, at random places of a volume 64 times larger.
        _ => (0..blocks)
            .map(|i| (i * 64 + next() % 64, raw(i)))
            .collect(),
    }
}

fn map_bytes(kind: &str, blocks: u64) -> (f64, f64) {
    let p = pattern(kind, blocks);
    let before = live();
    let mut m = BlockMap::default();
    for &(b, e) in &p {
        m.put(b, e);
    }
    let new = (live() - before) as f64 / blocks as f64;
    drop(m);
    let before = live();
    let mut m: BTreeMap<u64, OldExtent> = BTreeMap::new();
    for &(b, e) in &p {
        m.insert(b, old(e));
    }
    let was = (live() - before) as f64 / blocks as f64;
    (new, was)
}

fn crc_figures() {
    let buf: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let rounds = 16;
    let t = Instant::now();
    let mut acc = 0u32;
    for _ in 0..rounds {
        for block in buf.chunks(4096) {
            acc = acc.wrapping_add(crc32c::crc32c(block));
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let bytes = (buf.len() * rounds) as f64;
    println!(
        "crc32c: sse4.2 {} | 4 KiB blocks: {:.2} GB/s, {:.0} ns a block (sum {acc:08x})",
        std::arch::is_x86_feature_detected!("sse4.2"),
        bytes / secs / 1e9,
        secs * 1e9 / (bytes / 4096.0)
    );
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn open_figures(tib: f64, dir: &Path) -> anyhow::Result<()> {
    let blocks = (tib * (1u64 << 40) as f64) as u64 / 4096;
    let dir = tempfile::tempdir_in(dir).context("bench directory")?;
    let (meta_dir, dev) = (dir.path().join("meta"), dir.path().join("dev0"));
    let bytes = blocks * 4096;
    std::fs::File::create(&dev)?.set_len(bytes)?;
    let v = Uuid::new_v4();
    let t = Instant::now();
    {
        let meta = Meta::open(&meta_dir)?;
        meta.check_devices(&[(dev.display().to_string(), bytes)])?;
        meta.write_sequential_volume(1, v, blocks)?;
    }
    println!(
        "{tib} TiB volume: {blocks} blocks, rows written in {:.1} s, metadata {:.0} MiB on disk",
        t.elapsed().as_secs_f64(),
        dir_bytes(&meta_dir) as f64 / (1 << 20) as f64
    );
    for round in 1..=2 {
        let (rss0, heap0) = (status_kib("VmRSS:"), live());
        let t = Instant::now();
        let store = BlockStore::open(
            &meta_dir,
            &[DeviceSpec {
                path: dev.clone(),
                size_bytes: bytes,
            }],
        )?;
        let secs = t.elapsed().as_secs_f64();
        let (rss, heap) = (status_kib("VmRSS:"), live() - heap0);
        let m = store.map_memory();
        anyhow::ensure!(m.data_blocks == blocks, "opened {} blocks", m.data_blocks);
        println!(
            "open #{round}: {secs:.2} s | RSS {:.0} MiB (+{:.0} MiB, peak {:.0} MiB) | heap +{:.0} MiB \
             = {:.2} B/block (map bound {:.2} B/block, allocator {:.0} MiB)",
            rss as f64 / 1024.0,
            (rss as f64 - rss0 as f64) / 1024.0,
            status_kib("VmHWM:") as f64 / 1024.0,
            heap as f64 / (1 << 20) as f64,
            heap as f64 / blocks as f64,
            m.map_bytes as f64 / blocks as f64,
            m.alloc_bytes as f64 / (1 << 20) as f64,
        );
        drop(store);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut tib, mut dir, mut open) = (1.0f64, PathBuf::from("/dev/shm"), true);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tib" => tib = args.next().context("--tib N")?.parse()?,
            "--dir" => dir = args.next().context("--dir PATH")?.into(),
            "--no-open" => open = false,
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    crc_figures();
    for (kind, blocks) in [
        ("sequential", 1u64 << 22),
        ("random", 1 << 20),
        ("sparse", 1 << 16),
    ] {
        let (new, was) = map_bytes(kind, blocks);
        println!(
            "map memory, {kind:>10} ({blocks} blocks): {new:6.2} B/block (format 1: {was:6.2})"
        );
    }
    if open {
        open_figures(tib, &dir)?;
    }
    Ok(())
}
