//! The devices under the block store: files or block devices concatenated into one space of
//! 4 KiB pages, read and written through the connection's io_uring (or inline for memory-
//! backed files, where io_uring would only bounce the copy through a worker thread).
//!
//! Devices that take direct I/O at 512-byte granularity (block devices, files on disk file
//! systems) are opened with O_DIRECT: the page cache would only hold a second copy of what
//! the host caches, and direct I/O is what a device queue is fed with. Every transfer the
//! store makes is aligned for it: raw blocks are whole pages from the connection's page-
//! aligned slot buffers, compressed blocks are whole sectors from (or whole pages into) the
//! page-aligned scratch area. 512-byte granularity is required because compressed blocks are
//! packed as sectors inside a page and written without touching their neighbours (a read-
//! modify-write of the page would race another writer's block in it); a device that refuses
//! it (4 KiB logical sectors) and tmpfs (no O_DIRECT at all) are used buffered.
//!
//! A memory-backed device (tmpfs, ramfs) is also mapped into the process, and transfers
//! are copies to and from the mapping: a `pread`/`pwrite` there is the same copy behind a
//! system call, a page-cache lookup and an atime update, which cost more than the copy (a
//! profile of 4k random reads showed the `pread` path at ~38 % of the reactor's time). A
//! write through the mapping first makes sure the file's pages under it are allocated
//! (`fallocate`, [`COMMIT_REGION_BYTES`] at a time), so it never faults for want of memory:
//! when the file system is full the write goes through the file, which answers ENOSPC.
//! Reads reach only pages the store wrote before (it reads no extent it has not written),
//! so they never fault on a hole. A device file must not be truncated while it is open (as
//! for any pool device).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use io_uring::{opcode, types};

use crate::backend::IoQueue;
use crate::buffer::SlotBuf;
use crate::limits::{BLOCK_BYTES, POOL_DEVICES_MAX};

/// One device of the pool, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// A regular file (created sparse if missing) or a block device.
    pub path: PathBuf,
    /// Size for a file that has to be created or grown; ignored for block devices.
    pub size_bytes: u64,
}

#[derive(Debug)]
struct Dev {
    file: File,
    path: PathBuf,
    first_page: u64,
    pages: u64,
    direct: bool,
    /// Memory-backed devices: the file mapped, read and written by copying.
    map: Option<Mapping>,
}

/// A memory-backed device file mapped shared into the process.
#[derive(Debug)]
struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// One bit per [`COMMIT_REGION_BYTES`]: the file's pages there are allocated
    /// (`fallocate`), so a write through the mapping cannot fault for want of memory.
    committed: Box<[AtomicU64]>,
    /// The file system cannot allocate ahead (ramfs): writes go through the file.
    no_fallocate: AtomicBool,
}

/// Pages of a mapped device allocated at a time before writes through the mapping.
const COMMIT_REGION_BYTES: u64 = 2 << 20;

// SAFETY: the mapping is the file's shared memory. Transfers through it touch the ranges
// the store hands them, which no one writes meanwhile (the store never reads an extent
// while it is written, and frees one only after the reads that may use it are done): the
// same discipline as `pread`/`pwrite` on the file by several threads.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` shared, readable and writable; None if the kernel refuses.
    fn new(file: &File, len: u64) -> Option<Mapping> {
        let len = usize::try_from(len).ok().filter(|l| *l > 0)?;
        // SAFETY: a fresh mapping at an address the kernel picks, of a file we own; no
        // existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            tracing::debug!(
                "mapping a memory-backed pool device: {}",
                io::Error::last_os_error()
            );
            return None;
        }
        let regions = (len as u64).div_ceil(COMMIT_REGION_BYTES);
        Some(Mapping {
            ptr: std::ptr::NonNull::new(ptr.cast())?,
            len,
            committed: (0..regions.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            no_fallocate: AtomicBool::new(false),
        })
    }

    /// Makes sure the file's pages under `off..off + len` are allocated; false if the file
    /// system refused (full): the caller writes through the file instead, which reports it.
    fn commit(&self, file: &File, off: u64, len: usize) -> bool {
        if self.no_fallocate.load(Ordering::Relaxed) {
            return false;
        }
        let first = off / COMMIT_REGION_BYTES;
        let last = (off + len.max(1) as u64 - 1) / COMMIT_REGION_BYTES;
        for r in first..=last {
            let (word, bit) = (&self.committed[(r / 64) as usize], 1u64 << (r % 64));
            if word.load(Ordering::Acquire) & bit != 0 {
                continue;
            }
            let at = r * COMMIT_REGION_BYTES;
            let n = COMMIT_REGION_BYTES.min(self.len as u64 - at);
            // SAFETY: fallocate on a descriptor we own; mode 0 only allocates what is not
            // allocated yet, within the file's size.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, at as i64, n as i64) };
            if rc != 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
                    self.no_fallocate.store(true, Ordering::Relaxed);
                }
                return false;
            }
            word.fetch_or(bit, Ordering::AcqRel);
        }
        true
    }

    /// Copies `len` bytes from `buf` to `off`; false if the range is outside the mapping or
    /// its pages could not be allocated.
    ///
    /// # Safety
    /// `buf` must be valid for reads of `len` bytes and not overlap the mapping.
    unsafe fn write(&self, file: &File, off: u64, buf: *const u8, len: usize) -> bool {
        let Some(end) = usize::try_from(off).ok().and_then(|o| o.checked_add(len)) else {
            return false;
        };
        if end > self.len || !self.commit(file, off, len) {
            return false;
        }
        // SAFETY: `off..end` lies inside the mapping, its pages allocated; the caller
        // vouches for `buf`; nobody reads or writes this range meanwhile (see `Send`).
        unsafe { copy_to_pool(self.ptr.as_ptr().add(off as usize), buf, len) };
        true
    }

    /// Copies `len` bytes at `off` into `buf`; false if the range is outside the mapping.
    ///
    /// # Safety
    /// `buf` must be valid for writes of `len` bytes and not overlap the mapping.
    unsafe fn read(&self, off: u64, buf: *mut u8, len: usize) -> bool {
        let Some(end) = usize::try_from(off).ok().and_then(|o| o.checked_add(len)) else {
            return false;
        };
        if end > self.len {
            return false;
        }
        // SAFETY: `off..end` lies inside the mapping (checked above); the caller vouches for
        // `buf`; nobody writes this range meanwhile (see the `Send` impl).
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off as usize), buf, len);
        }
        true
    }
}

/// Copies `len` bytes from `src` to `dst` in a mapped pool device. Whole 64-byte lines to a
/// 16-byte aligned destination (every block and compressed slot: sectors are 512 bytes) go
/// with non-temporal stores on x86-64: a block written to the pool is seldom read back soon,
/// and a store that bypasses the cache does not first read the line it overwrites. A 4 KiB
/// copy to a random page of a 1 GiB tmpfs mapping took 920 ns with `memcpy` and 490 ns so
/// on this machine's CPU; the store fence at the end orders the copy before whatever
/// publishes the block (its mapping, a completion).
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, not overlapping.
unsafe fn copy_to_pool(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if len.is_multiple_of(64) && (dst as usize).is_multiple_of(16) {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        let mut i = 0;
        while i < len {
            // SAFETY: SSE2 is part of x86-64; `i + 64 <= len` and the caller vouches for
            // both ranges; the destination is 16-byte aligned as the stores require.
            unsafe {
                let (s, d) = (src.add(i), dst.add(i));
                let a = _mm_loadu_si128(s.cast::<__m128i>());
                let b = _mm_loadu_si128(s.add(16).cast::<__m128i>());
                let c = _mm_loadu_si128(s.add(32).cast::<__m128i>());
                let e = _mm_loadu_si128(s.add(48).cast::<__m128i>());
                _mm_stream_si128(d.cast::<__m128i>(), a);
                _mm_stream_si128(d.add(16).cast::<__m128i>(), b);
                _mm_stream_si128(d.add(32).cast::<__m128i>(), c);
                _mm_stream_si128(d.add(48).cast::<__m128i>(), e);
            }
            i += 64;
        }
        // SAFETY: a fence has no memory operands.
        unsafe { _mm_sfence() };
        return;
    }
    // SAFETY: forwarded caller contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no reference into it outlives the
        // device that owns it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A raw transfer of whole sectors.
#[derive(Debug, Clone, Copy)]
pub struct RawOp {
    /// Write (else read).
    pub write: bool,
    /// First pool sector.
    pub sector: u64,
    /// Bytes (a multiple of 512 that does not cross a device end).
    pub len: u32,
    /// Memory to read into or write from.
    pub buf: *mut u8,
}

/// Operations handed to the ring at once (half its entries: the completion queue, twice as
/// deep, never overflows).
const URING_GROUP: usize = crate::limits::RING_ENTRIES as usize / 2;

/// The devices, addressed as one run of pages. Devices are only ever appended (at open, or
/// while serving: [`Pool::append`]), so the I/O path reads the list without a lock.
#[derive(Debug)]
pub struct Pool {
    /// [`POOL_DEVICES_MAX`] slots, the first `count` filled in order.
    devs: Box<[OnceLock<Dev>]>,
    count: AtomicUsize,
    pages: AtomicU64,
    /// Every device is memory-backed (transfers run inline).
    inline: AtomicBool,
}

impl Pool {
    /// Opens (creating sparse files where missing) every device, in order.
    pub fn open(specs: &[DeviceSpec]) -> io::Result<Pool> {
        let pool = Pool {
            devs: (0..POOL_DEVICES_MAX).map(|_| OnceLock::new()).collect(),
            count: AtomicUsize::new(0),
            pages: AtomicU64::new(0),
            inline: AtomicBool::new(true),
        };
        for s in specs {
            pool.append(s)?;
        }
        Ok(pool)
    }

    /// Opens `spec` and appends it after the last device; returns its pages. One caller at a
    /// time (the store appends under its tree lock); I/O may run meanwhile.
    pub fn append(&self, spec: &DeviceSpec) -> io::Result<u64> {
        let slot = self.count.load(Ordering::Acquire);
        let Some(cell) = self.devs.get(slot) else {
            return Err(io::Error::other(format!(
                "a pool holds at most {POOL_DEVICES_MAX} devices"
            )));
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!is_block_device(&spec.path))
            .truncate(false)
            .open(&spec.path)?;
        let md = file.metadata()?;
        let bytes = if md.is_file() {
            if md.len() < spec.size_bytes {
                file.set_len(spec.size_bytes)?;
            }
            md.len().max(spec.size_bytes)
        } else {
            evstor_ffi::block_device_size(&spec.path)?
        };
        let pages = bytes / BLOCK_BYTES;
        let memory = crate::backend::memory_backed(&file);
        let (file, direct) = match (!memory).then(|| open_direct(&spec.path)).flatten() {
            Some(f) => (f, true),
            None => (file, false),
        };
        let first_page = self.pages.load(Ordering::Acquire);
        let map = if memory {
            Mapping::new(&file, pages * BLOCK_BYTES)
        } else {
            None
        };
        let dev = Dev {
            file,
            path: spec.path.clone(),
            first_page,
            pages,
            direct,
            map,
        };
        if cell.set(dev).is_err() {
            return Err(io::Error::other("pool devices appended concurrently"));
        }
        if !memory {
            self.inline.store(false, Ordering::Release);
        }
        self.count.store(slot + 1, Ordering::Release);
        self.pages.store(first_page + pages, Ordering::Release);
        Ok(pages)
    }

    fn devs(&self) -> impl Iterator<Item = &Dev> {
        self.devs[..self.count.load(Ordering::Acquire)]
            .iter()
            .filter_map(OnceLock::get)
    }

    /// Capacity in 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.pages.load(Ordering::Acquire)
    }

    /// Whether some device is memory-backed and mapped.
    pub fn is_mapped(&self) -> bool {
        self.devs().any(|d| d.map.is_some())
    }

    /// Whether every device bypasses the page cache (O_DIRECT).
    pub fn is_direct(&self) -> bool {
        self.devs().all(|d| d.direct)
    }

    /// Device paths with their sizes in bytes.
    pub fn devices(&self) -> impl Iterator<Item = (&Path, u64)> {
        self.devs()
            .map(|d| (d.path.as_path(), d.pages * BLOCK_BYTES))
    }

    /// Whether `sector` is the first of a device after the first (a transfer must not run
    /// into it from the device before).
    pub fn starts_device(&self, sector: u64) -> bool {
        sector.is_multiple_of(8) && self.devs().skip(1).any(|d| d.first_page * 8 == sector)
    }

    /// The device holding `sector`.
    pub fn device_of(&self, sector: u64) -> &Path {
        &self.locate(sector).0.path
    }

    fn locate(&self, sector: u64) -> (&Dev, u64) {
        let page = sector / 8;
        let mut found = None;
        for d in self.devs() {
            found = Some(d);
            if d.first_page + d.pages > page {
                break;
            }
        }
        let d = found.expect("invariant: I/O reaches only pools with a device");
        (d, (sector - d.first_page * 8) * 512)
    }

    /// Asks the CPU to start loading the first lines of `sector` of a mapped device (a read
    /// of it follows; the rest of its page the hardware prefetcher streams).
    pub fn prefetch(&self, sector: u64) {
        let (d, off) = self.locate(sector);
        if let Some(m) = &d.map {
            if let Some(end) = usize::try_from(off).ok().filter(|o| o + 128 <= m.len) {
                // SAFETY: `end..end + 128` lies inside the mapping (checked); only an address
                // is formed, nothing is dereferenced.
                let p = unsafe { m.ptr.as_ptr().add(end) };
                crate::blockstore::prefetch(p);
                crate::blockstore::prefetch(p.wrapping_add(64));
            }
        }
    }

    /// Runs every op and leaves each one's outcome in `res` (see [`op_result`]); returns the
    /// first failure (as -errno) or 0.
    ///
    /// # Safety
    /// Every op's `buf` must be valid for `len` bytes (writable for reads) and not touched
    /// by anyone else until this returns.
    pub unsafe fn run(&self, q: &mut IoQueue, ops: &[RawOp], res: &mut [i32]) -> i32 {
        if self.inline.load(Ordering::Acquire) || !q.is_uring() {
            for (op, r) in ops.iter().zip(res.iter_mut()) {
                // SAFETY: forwarded caller contract.
                *r = unsafe { self.run_one(op) };
            }
        } else {
            // In groups the completion queue holds whole.
            for (ops, res) in ops.chunks(URING_GROUP).zip(res.chunks_mut(URING_GROUP)) {
                let entries = ops.iter().map(|op| {
                    let (d, off) = self.locate(op.sector);
                    let fd = types::Fd(d.file.as_raw_fd());
                    if op.write {
                        opcode::Write::new(fd, op.buf, op.len).offset(off).build()
                    } else {
                        opcode::Read::new(fd, op.buf, op.len).offset(off).build()
                    }
                });
                // SAFETY: the buffers stay valid until run_batch has reaped every
                // completion; the files live as long as self.
                if let Err(e) = unsafe { q.run_batch(entries, &mut res[..ops.len()]) } {
                    res[..ops.len()].fill(-e.raw_os_error().unwrap_or(libc::EIO));
                }
            }
        }
        for (op, &r) in ops.iter().zip(res.iter()) {
            let r = op_result(op, r);
            if r < 0 {
                return r;
            }
        }
        0
    }

    /// # Safety
    /// As [`Pool::run`].
    unsafe fn run_one(&self, op: &RawOp) -> i32 {
        let (d, off) = self.locate(op.sector);
        debug_assert!(
            !d.direct || (op.buf as usize).is_multiple_of(512),
            "unaligned buffer for O_DIRECT"
        );
        let len = op.len as usize;
        if let Some(m) = &d.map {
            if !op.write {
                // SAFETY: caller guarantees buf is valid and exclusively ours for len bytes.
                return match unsafe { m.read(off, op.buf, len) } {
                    true => op.len as i32,
                    false => -libc::EIO,
                };
            }
            // SAFETY: caller guarantees buf is valid for len bytes. (When the pages cannot
            // be allocated, the write below through the file reports why.)
            if unsafe { m.write(&d.file, off, op.buf, len) } {
                return op.len as i32;
            }
        }
        let r = if op.write {
            // SAFETY: caller guarantees buf is valid for len bytes.
            let b = unsafe { std::slice::from_raw_parts(op.buf, len) };
            d.file.write_all_at(b, off)
        } else {
            // SAFETY: caller guarantees buf is valid and exclusively ours for len bytes.
            let b = unsafe { std::slice::from_raw_parts_mut(op.buf, len) };
            d.file.read_exact_at(b, off)
        };
        match r {
            Ok(()) => op.len as i32,
            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// Makes every completed write durable.
    pub fn sync(&self) -> io::Result<()> {
        for d in self.devs() {
            d.file.sync_data()?;
        }
        Ok(())
    }
}

/// An op's outcome from its transfer result: 0, or -errno (a short transfer is -EIO).
pub fn op_result(op: &RawOp, r: i32) -> i32 {
    if r < 0 {
        r
    } else if r as u32 != op.len {
        -libc::EIO
    } else {
        0
    }
}

/// Opens with O_DIRECT and proves a 512-byte aligned read works; None if the device or file
/// system refuses either.
fn open_direct(path: &Path) -> Option<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()?;
    let mut probe = SlotBuf::new(1, 4096)?;
    match f.read_at(&mut probe.slot_mut(0, 4096)[..512], 0) {
        Ok(512) => Some(f),
        _ => None,
    }
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o_direct(f: &File) -> bool {
        // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        flags & libc::O_DIRECT != 0
    }

    #[test]
    fn a_pool_copy_writes_exactly_its_range_whatever_the_length_and_alignment() {
        let src: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        // Streamed (whole lines, aligned), and every fallback: a partial line, an odd
        // destination, a length under one line.
        for (at, len) in [
            (0, 4096),
            (512, 1536),
            (64, 64),
            (16, 128),
            (0, 100),
            (3, 4096),
            (8, 64),
        ] {
            let mut dst = vec![0xeeu8; 8192 + 64];
            let base = dst.as_mut_ptr().align_offset(64);
            // SAFETY: `base + at + len` is within `dst` (at most 64 + 512 + 4096 bytes in);
            // `src` holds `len` bytes; the two do not overlap.
            unsafe { copy_to_pool(dst.as_mut_ptr().add(base + at), src.as_ptr(), len) };
            let (from, to) = (base + at, base + at + len);
            assert_eq!(&dst[from..to], &src[..len], "copied: at {at}, len {len}");
            assert!(
                dst[..from].iter().chain(&dst[to..]).all(|&b| b == 0xee),
                "nothing outside the range touched: at {at}, len {len}"
            );
        }
    }

    /// Writes a raw page and three packed sectors mid-page through `run`, reads both back.
    fn round_trip(p: &Pool) {
        let mut buf = SlotBuf::new(2, 4096).expect("buf");
        buf.slot_mut(0, 4096).fill(0x5a);
        buf.slot_mut(1, 4096)[..1536].fill(0xa5);
        let ops = [
            RawOp {
                write: true,
                sector: 8,
                len: 4096,
                buf: buf.slot_ptr(0),
            },
            RawOp {
                write: true,
                sector: 16 + 3,
                len: 1536,
                buf: buf.slot_ptr(1),
            },
        ];
        let mut res = [0; 2];
        let mut q = IoQueue::new_sync();
        // SAFETY: both buffers outlive the calls.
        assert_eq!(unsafe { p.run(&mut q, &ops, &mut res) }, 0);
        let mut back = SlotBuf::new(2, 4096).expect("buf");
        let reads = [
            RawOp {
                write: false,
                sector: 8,
                len: 4096,
                buf: back.slot_ptr(0),
            },
            RawOp {
                write: false,
                sector: 16,
                len: 4096,
                buf: back.slot_ptr(1),
            },
        ];
        // SAFETY: as above.
        assert_eq!(unsafe { p.run(&mut q, &reads, &mut res) }, 0);
        assert!(back.slot(0, 4096).iter().all(|&b| b == 0x5a));
        let page = back.slot(1, 4096);
        assert!(page[..1536].iter().all(|&b| b == 0));
        assert!(page[1536..3072].iter().all(|&b| b == 0xa5));
        assert!(page[3072..].iter().all(|&b| b == 0));
    }

    /// A file system of the test's own, unmounted when dropped.
    struct Mounted(tempfile::TempDir);

    impl Mounted {
        /// Mounts `fstype` with `opts` on a fresh directory; None (said why) when not root
        /// or the mount is refused (a container without CAP_SYS_ADMIN?).
        fn new(fstype: &str, opts: &[&str]) -> Option<Mounted> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("not root: no {fstype} of our own");
                return None;
            }
            let dir = tempfile::tempdir().expect("tempdir");
            let mounted = std::process::Command::new("mount")
                .args(["-t", fstype])
                .args(opts)
                .arg("evstor-test")
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            if !mounted {
                eprintln!("cannot mount a {fstype} here (a container without CAP_SYS_ADMIN?)");
                return None;
            }
            Some(Mounted(dir))
        }

        fn path(&self) -> &Path {
            self.0.path()
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.0.path())
                .status();
        }
    }

    /// Writes (filled with `fill`) or reads page `page` of `p` through `buf`'s first slot;
    /// the result.
    fn page_io(p: &Pool, write: bool, page: u64, fill: u8, buf: &mut SlotBuf) -> i32 {
        if write {
            buf.slot_mut(0, 4096).fill(fill);
        }
        let op = RawOp {
            write,
            sector: page * 8,
            len: 4096,
            buf: buf.slot_ptr(0),
        };
        let mut res = [0];
        let mut q = IoQueue::new_sync();
        // SAFETY: the buffer outlives the call.
        unsafe { p.run(&mut q, &[op], &mut res) }
    }

    /// A mapped device on a full tmpfs answers writes with ENOSPC (through the file), never
    /// a fault, and keeps what it holds. Needs root to mount a 1 MiB tmpfs (as CI runs on
    /// this machine kind).
    #[test]
    fn a_full_tmpfs_answers_enospc_and_keeps_its_data() {
        let Some(dir) = Mounted::new("tmpfs", &["-o", "size=1m"]) else {
            return;
        };
        let spec = DeviceSpec {
            path: dir.path().join("d"),
            size_bytes: 8 << 20,
        };
        let p = Pool::open(&[spec]).expect("a sparse 8 MiB device on 1 MiB of tmpfs");
        assert!(p.devs().next().is_some_and(|d| d.map.is_some()), "mapped");
        let mut buf = SlotBuf::new(1, 4096).expect("buf");
        let io = |write: bool, page: u64, fill: u8, buf: &mut SlotBuf| {
            page_io(&p, write, page, fill, buf)
        };
        // One page per 2 MiB region (each asks the file system for the whole region first):
        // the first fits, the rest cannot.
        assert_eq!(io(true, 0, 0x11, &mut buf), 0, "the first page");
        let mut refused = 0;
        for region in 1..4u64 {
            let r = io(true, region * 512, 0x22, &mut buf);
            assert!(r == 0 || r == -libc::ENOSPC, "region {region}: {r}");
            refused += usize::from(r == -libc::ENOSPC);
        }
        // Fill what is left of the file system through pages in the first region.
        for page in 1..512u64 {
            let r = io(true, page, 0x33, &mut buf);
            if r == -libc::ENOSPC {
                refused += 1;
                break;
            }
            assert_eq!(r, 0, "page {page}");
        }
        assert!(refused > 0, "a 1 MiB tmpfs took 8 MiB of writes");
        assert_eq!(io(false, 0, 0, &mut buf), 0);
        assert!(buf.slot(0, 4096).iter().all(|b| *b == 0x11), "page 0 kept");
    }

    /// A device on ramfs (memory-backed, but no `fallocate`) is mapped for reads and its
    /// writes go through the file once `fallocate` said it cannot: what is written reads
    /// back, in every region. Needs root to mount a ramfs.
    #[test]
    fn a_ramfs_device_is_written_through_the_file_and_read_back() {
        let Some(dir) = Mounted::new("ramfs", &[]) else {
            return;
        };
        let spec = DeviceSpec {
            path: dir.path().join("d"),
            size_bytes: 8 << 20,
        };
        let p = Pool::open(&[spec]).expect("a device on ramfs");
        let map = |p: &Pool| {
            p.devs().next().and_then(|d| {
                d.map
                    .as_ref()
                    .map(|m| m.no_fallocate.load(Ordering::Relaxed))
            })
        };
        assert_eq!(map(&p), Some(false), "mapped, fallocate not tried yet");
        let mut buf = SlotBuf::new(1, 4096).expect("buf");
        let io = |write: bool, page: u64, fill: u8, buf: &mut SlotBuf| {
            page_io(&p, write, page, fill, buf)
        };
        let pages = [0u64, 1, 700, 2047];
        for (i, page) in pages.iter().enumerate() {
            assert_eq!(
                io(true, *page, 0x40 + i as u8, &mut buf),
                0,
                "write page {page}"
            );
        }
        for (i, page) in pages.iter().enumerate() {
            assert_eq!(io(false, *page, 0, &mut buf), 0, "read page {page}");
            assert!(
                buf.slot(0, 4096).iter().all(|b| *b == 0x40 + i as u8),
                "page {page} reads back"
            );
        }
        assert_eq!(
            map(&p),
            Some(true),
            "ramfs said it cannot allocate ahead, once"
        );
    }

    #[test]
    fn files_on_disk_are_opened_o_direct_and_tmpfs_files_buffered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = DeviceSpec {
            path: dir.path().join("d"),
            size_bytes: 1 << 20,
        };
        let p = Pool::open(std::slice::from_ref(&spec)).expect("pool");
        assert!(
            !crate::backend::memory_backed(&p.devs().next().expect("a device").file),
            "TMPDIR is memory-backed: O_DIRECT cannot be tested here"
        );
        assert!(p.is_direct() && o_direct(&p.devs().next().expect("a device").file));
        round_trip(&p);
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let dir = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
            let spec = DeviceSpec {
                path: dir.path().join("d"),
                size_bytes: 1 << 20,
            };
            let p = Pool::open(&[spec]).expect("pool on tmpfs");
            let d = p.devs().next().expect("a device");
            assert!(
                !p.is_direct() && !o_direct(&d.file) && p.inline.load(Ordering::Relaxed),
                "tmpfs: buffered, inline"
            );
            assert!(d.map.is_some(), "tmpfs: mapped");
            round_trip(&p);
            // A read past the device's end is refused, not copied from beyond the mapping.
            let mut buf = SlotBuf::new(1, 4096).expect("buf");
            let past = RawOp {
                write: false,
                sector: (1 << 20) / 512,
                len: 4096,
                buf: buf.slot_ptr(0),
            };
            // SAFETY: the buffer outlives the call.
            assert_eq!(unsafe { p.run_one(&past) }, -libc::EIO);
        }
    }
}
